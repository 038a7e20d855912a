"""What people read: report.json (`report.py`), model cards (`cards.py`), the terminal tables of a run
(`tables.py`) and the leaderboard (`leaderboard.py`)."""
