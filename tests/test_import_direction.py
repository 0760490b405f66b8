"""The layers import downwards only: ``nn``, ``ops``, ``measure`` and ``serialize`` sit below
``compress`` and never load it (a transform may use a module; a module never needs a
transform). Checked in a fresh interpreter, where ``sys.modules`` holds exactly what the imports
pulled in."""

from __future__ import annotations

import json
import subprocess
import sys

# Import the lower layers one after the other and list the compress modules loaded after each:
# while the list stays empty, none of the imports so far loaded compress. The last import is a
# control: compress itself must show up, or the probe could not see anything.
CODE = """
import importlib, json, sys
seen = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    seen[name] = sorted(m for m in sys.modules if m.startswith("leantorch.compress"))
print(json.dumps(seen))
"""
LOWER = ["leantorch.ops", "leantorch.nn", "leantorch.measure", "leantorch.serialize",
         "leantorch"]


def test_lower_layers_do_not_load_compress() -> None:
    result = subprocess.run([sys.executable, "-c", CODE, *LOWER, "leantorch.compress.moefy"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert {name: seen[name] for name in LOWER} == {name: [] for name in LOWER}
    assert "leantorch.compress.moefy.sites" in seen["leantorch.compress.moefy"]
