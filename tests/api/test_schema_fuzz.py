"""Property-based fuzzing of the whole HTTP API from its OpenAPI schema (schemathesis): no input
may produce a 5xx. Runs against a stack whose only worker serves dry runs, so fuzzed specs are
recorded, never trained."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


from trainq.stack import LocalStack


def test_no_input_makes_the_api_fail_with_a_server_error(tmp_path: Path):
    cli = shutil.which("st", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is a dev dependency (pip install -e '.[dev]')"
    with LocalStack(tmp_path, workers=0, isolated=True) as stack:
        stack.start_worker("dry-runs", queues=[stack.settings.dry_run_queue])
        result = subprocess.run(
            [cli, "run", f"{stack.api_url}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "40", "--request-timeout", "30", "--seed", "1"],
            capture_output=True, text=True, timeout=600,
        )
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    assert " passed" in summary and "Server error" not in summary
