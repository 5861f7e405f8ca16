import re
import subprocess
import sys

from orchestrator.cli import spec_reference_markdown
from orchestrator.spec_text import field_reference
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


def test_every_test_the_docs_name_exists():
    """docs/reliability.md and the README cite tests as promises' proof: a renamed or merged test must not
    leave a citation of nothing behind."""
    cited = re.compile(r"`(?:tests/(?:unit|integration)/)?(test_\w+\.py)::(test_\w+)")
    missing = []
    for doc in ("docs/reliability.md", "README.md"):
        for file, name in cited.findall((ROOT / doc).read_text()):
            sources = [path.read_text() for path in ROOT.glob(f"tests/*/{file}")]
            if not any(re.search(rf"^def {name}\(", source, re.M) for source in sources):
                missing.append(f"{doc}: {file}::{name}")
    assert not missing, missing
