"""Views of a run that read what the stages wrote and never change it. Each module imports
only those above it in this list:

    inspection.py  `grpo inspect`: the run table, groups of completions, registered versions
    state.py       tracking.json: what was sent to which tracker and registry
    views.py       Prefect artifacts per stage and the learning-curve PNG, on a background thread
    tracking.py    MLflow and TensorBoard sinks fed from the metrics files
    registry.py    the MLflow model registry and its promotion gate
"""
