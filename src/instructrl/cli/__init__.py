"""The ``instructrl`` command: one sub-command per stage.

Every stage reads the pipeline config (defaults < ``--config FILE`` < ``section.key=value``
overrides) and writes under ``run.dir``/<stage>. Bad input ends with one line naming the file,
line or key and exit status 2; ``--debug`` shows the traceback instead.

root.py holds the Typer app and what the commands share; stages.py the stages' commands; serve.py
serve and chat; checks.py config and data check; label.py the feedback app's; exits.py run(), the
entry point, and how the process ends.
"""

# isort: off
# each module adds its commands to the app as it is imported: in this order, the order of --help
from instructrl.cli import stages  # noqa: F401
from instructrl.cli import serve  # noqa: F401
from instructrl.cli import checks  # noqa: F401
from instructrl.cli import label  # noqa: F401
# isort: on
from instructrl.cli.exits import run  # noqa: F401
from instructrl.cli.root import app, unwrap_help

unwrap_help(app)
