"""Scaling laws for a user's own dataset in one command (`drscaling study`): see run.py."""

from drscaling.study.run import StudyConfig, run_study

__all__ = ["StudyConfig", "run_study"]
