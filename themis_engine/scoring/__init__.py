"""Scoring: conversations in, one float32 reward per criterion out.

    scorer.py   Scorer: chat template -> prompt groups -> packed prefix-shared forward passes
    budget.py   token budgets: the default rule, and the one measured from free GPU memory
    demo.py     `python -m themis_engine.scoring.demo`: a tiny random model scored and checked
"""

from themis_engine.scoring.scorer import Scorer, ScoreReport

__all__ = ["ScoreReport", "Scorer"]
