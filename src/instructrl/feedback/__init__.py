"""The feedback app: people write demonstrations, rank K responses and judge A/B comparisons.

db.py (SQLite schema, WAL, transactions), accounts.py (users, passwords, tokens), tasks.py
(projects, assignment, leases, overlap, skips, answers: plain functions, no HTTP), agreement.py
(pairwise agreement, Krippendorff's alpha), export.py (SFT demonstrations, comparison records,
TRL pairs), projects.py (tasks from prompts files and models), app.py (the FastAPI app, the only
module that imports fastapi).
"""
