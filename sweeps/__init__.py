"""Model selection: study 002's two-stage sweep on Optuna, with leaderboards, reports and the winner."""
