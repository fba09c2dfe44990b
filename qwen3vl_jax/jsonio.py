"""Writing the small JSON files of a checkpoint directory."""

import json


def write_json(file: str, value: dict) -> None:
    with open(file, "w") as f:
        json.dump(value, f, indent=2)
