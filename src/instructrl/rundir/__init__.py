"""A stage's run directory: resolved config, seed, metrics, TensorBoard events, lineage.

    runs/<name>/<stage>/
        config.yaml      the resolved pipeline config the stage ran with
        run.json         seed, command line and working directory, versions (instructrl's git commit in a
                         checkout), start time, number of processes and of torch's CPU threads; a resumed
                         run's starts under "resumed"
        metrics.jsonl    one JSON object per logged step
        tb/              TensorBoard events of the same metrics
        lineage.json     the data and parent checkpoint this stage used, with content hashes (a hub
                         name: its cached snapshot's commit); a stage whose inputs changed since
                         is neither skipped nor resumed but refused
        checkpoints/     resumable training state (step-NNNNNNNN/)
        final/           the stage's output checkpoint (save_pretrained folder)
        done.json        written last: the stage finished
    runs/<name>/.<stage>.lock   held by the one process writing the stage (``hold``); says which

    files.py      content hashes and stamps of inputs; atomic writes, folder copies and replacements
    locks.py      the lock that makes one process the writer of a stage's folder
    identity.py   comparing a config with the one a folder's run was begun with
    run.py        RunDir (one stage's folder: start, skip or resume, records, done.json) and run.json's record
"""
