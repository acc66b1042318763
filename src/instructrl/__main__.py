from instructrl.cli import run

run()
