"""The README's Python API example runs as written (on a small dataset in place of photos/)."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import make_shapes

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_api_example_runs(tmp_path):
    section = README.read_text().split("## The Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    photos = make_shapes(tmp_path / "photos", per_class=12)
    image = photos / "circle" / "circle_000.png"
    assert '"photos/"' in code and '"cat.jpg"' in code
    script = code.replace('"photos/"', repr(str(photos))).replace('"cat.jpg"', repr(str(image)))
    # the example ends with `clf = pixclass.load("model/")`: the saved model, with its run's metrics
    script += ("\nassert clf.classes == ['circle', 'square', 'triangle'] and clf.metrics['n'] == 6\n"
               "print('OK', clf.predict(" + repr(str(image)) + ", k=1)[0]['class'])\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("OK ")
    assert (tmp_path / "model" / "pixclass.json").is_file()
    assert (tmp_path / "runs" / "photos" / "report.html").is_file()  # fit's run folder, as `pixclass train photos/`
