import re
import subprocess
import sys

from orchestrator.cli import spec_reference_markdown
from orchestrator.spec import field_reference
from tests.helpers import ROOT


def test_readme_spec_reference_matches_the_code():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- spec-reference:start -->\n(.*)\n<!-- spec-reference:end -->", readme, re.S).group(1)
    assert block == spec_reference_markdown(field_reference()), "run `keel spec` and paste it into README.md"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = re.search(r"Run the tests:\n\n```bash\n(.+)\n```", readme).group(1)
    assert test_command in (ROOT / ".ci/run").read_text().splitlines()


def test_python_dash_m_orchestrator_works():
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "keel" in proc.stdout
