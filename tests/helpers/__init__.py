"""Helpers shared by the tests: tiny models (`models`) and tokenizers and data (`data`)."""
