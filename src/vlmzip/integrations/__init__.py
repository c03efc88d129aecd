"""Integrations with other tools (optional extras): the lmms-eval plugin lives in `lmms_eval_plugin`."""
