"""Online training: runs that make their own batches by generating with the model on the
serving engine. `run.py` is GRPO's run (`GRPORun`, the loop's `Run` with generated
micro-batches), `prompts.py` reads its prompt-only data. It sits above serving (it generates
with `serve.offline`) and below judging; the loop reaches it through the objective registry
(`Objective.run`)."""
