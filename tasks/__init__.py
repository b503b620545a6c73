"""Pipeline stages: each module holds one stage's plain function and its Prefect task."""
