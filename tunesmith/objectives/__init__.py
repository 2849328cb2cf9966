"""Training objectives beside the methods: what the loss is computed from. `losses.py` holds
the preference losses (DPO, IPO, SimPO, ORPO, KTO, Bradley–Terry reward) as functions of
log-probabilities; the `objective:` section and its registry are issue 32's next step."""
