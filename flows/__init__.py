"""The flows: how the stages of tasks/ are wired into runs, and everything around a run.

    train.py       the training flow; its body is the pipeline, stages in order
    rescore.py     the re-scoring flow: score + advantages again on stored generations
    serve.py       scheduled retraining: each run continues the folder on unseen prompts
    runner.py      one StageRunner per flow run: runs, skips, records and replays stages
    settings.py    each stage's typed settings, built once from the config
    start.py       what a run does before its first stage (preflight, start block)
    resume.py      the settings a resumed run folder may and may not change
    config.py      the one config model; its field descriptions are the --help
    cli.py         `grpo`: run, rescore, inspect, serve
    prefect_server.py  the temporary Prefect API a command starts for itself
    cluster/       where generate, score and update run: this process or a Ray cluster
    observe/       read-only views of a run: inspection, stage reports and curve, tracking, registry

Imports point downward: flows -> tasks -> rewards, data (tests/test_architecture.py).
"""
