#!/usr/bin/env bash
# The SPINEPS 2.1.3 reference environment that tests call as an oracle (tests/spineps_oracle.py).
#
#   bash scripts/spineps_env.sh [DIR]     # DIR defaults to .spineps-env in the repository root
#
# A virtualenv of its own: antspyx 0.6.3 (which SPINEPS pins) needs numpy < 2.4 and scipy < 1.16, the
# project does not. Every package is pinned exactly and installed with --no-deps in one pip call, so
# nothing is resolved here. Left out on purpose (`pip check` names exactly these six): timm (via
# dynamic-network-architectures; it pulls torchvision and a CUDA torch), the `pathlib` backport that
# TypeSaveArgParse names (it breaks Python 3), and what the code paths used never import (nnunetv2's
# graphviz, imagecodecs, yacs; batchgenerators' unittest2). seaborn is in: nnunetv2's `nnUNetPredictor`
# imports it through its training logger, and bench/run_all.py times that predictor. Once created, the environment needs
# no network: models come from local folders (SPINEPS_SEGMENTOR_MODELS or -ms/-mi/-ml PATH, `--no-crop`).
# Idempotent: when DIR/bin/python imports spineps, TPTBox, ants and nnunetv2 and holds every pinned
# version below, it exits 0 at once; otherwise it recreates DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$ROOT/.spineps-env}"
PYTHON="${PYTHON:-python3.11}"

PACKAGES=(
  # The reference and its own packages.
  SPINEPS==2.1.3 TPTBox==1.1.0 antspyx==0.6.3 nnunetv2==2.8.1 monai==1.6.1 pytorch-lightning==2.6.6
  torchmetrics==1.9.0 lightning-utilities==0.15.3 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5
  batchgeneratorsv2==0.3.6 acvl-utils==0.2.6 TypeSaveArgParse==1.0.3 einops==0.6.1
  # PyTorch, the CPU build, and what it requires.
  torch==2.13.0+cpu setuptools==84.2.1 filelock==4.3.2 fsspec==2026.9.0 Jinja2==3.1.6 MarkupSafe==3.0.4 mpmath==1.3.0
  networkx==3.6.1 sympy==1.14.0 typing_extensions==4.16.0
  # The light dependencies (numpy < 2.4 and scipy < 1.16 for antspyx).
  numpy==2.3.5 scipy==1.15.3 simpleitk==2.5.7 connected-components-3d==3.29.0 fill_voids==2.1.2 fastremap==1.21.0
  dill==0.3.9 joblib==1.6.0 nibabel==5.4.2 importlib_resources==7.1.0 numpy-stl==4.1.1 python-utils==4.2.0
  pynrrd==1.1.3 trimesh==5.2.0 scikit-image==0.26.0 ImageIO==2.38.2 lazy-loader==0.6 tifffile==2026.3.3
  scikit-learn==1.9.1 threadpoolctl==3.8.0 narwhals==2.29.0 cloudpickle==3.1.3
  matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3
  pillow==13.0.0 pandas==3.1.1 python-dateutil==4.0.0 tzdata==2026.6 packaging==26.4 PyYAML==6.0.4
  statsmodels==0.15.0 patsy==1.0.3 formulaic==1.2.2 interface_meta==2.0.1 wrapt==2.5.2 webcolors==25.10.0
  tqdm==4.70.1 rich==13.9.4 markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0 psutil==7.2.2 future==1.0.0
  blosc2==4.15.0 msgpack==1.2.4 ndindex==1.10.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 httpx==0.29.0 httpcore==1.0.9 h11==0.16.0 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0
  anyio==4.16.0 idna==3.21 certifi==2026.10.19.post1 requests==2.34.2 charset-normalizer==3.5.3 urllib3==2.8.0
  ConfigArgParse==1.9.0 docstring_parser==0.18.0 ruamel.yaml==0.19.1 seaborn==0.13.2
)

# Exit 0 when DIR imports the reference and holds exactly the pinned versions.
ready() {
  [ -x "$DIR/bin/python" ] || return 1
  SPINEPS_NO_CITATION_REMINDER=1 "$DIR/bin/python" -I - "${PACKAGES[@]}" <<'PY'
import importlib.metadata as md, re, sys
import spineps, TPTBox, ants, nnunetv2  # noqa: F401
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
want = dict(pin.split("==") for pin in sys.argv[1:])
wrong = {name: have.get(norm(name)) for name, version in want.items() if have.get(norm(name)) != version}
assert not wrong, f"not the pinned versions: {wrong}"
PY
}

if ready 2>/dev/null; then
  echo "spineps_env: $DIR is ready"
  exit 0
fi

# Never wipe a folder that is not a virtualenv.
if [ -e "$DIR" ] && [ ! -f "$DIR/pyvenv.cfg" ] && [ -n "$(ls -A "$DIR")" ]; then
  echo "spineps_env: $DIR exists and is not a virtualenv; refusing to replace it" >&2
  exit 1
fi
echo "spineps_env: creating $DIR"
"$PYTHON" -m venv --clear "$DIR"
# pip -q still warns about this machine's find-links folders that lack a package; drop those lines only.
"$DIR/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${PACKAGES[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

SPINEPS_NO_CITATION_REMINDER=1 "$DIR/bin/python" -I - <<'PY'
import importlib.metadata, importlib.util
import spineps, TPTBox, ants, nnunetv2, torch  # noqa: F401
assert torch.version.cuda is None and torch.__version__.endswith("+cpu"), f"not the CPU torch: {torch.__version__}"
extra = [name for name in ("torchvision", "timm") if importlib.util.find_spec(name) is not None]
assert not extra, f"{extra} must not be installed (they pull a CUDA torch)"
print(f"spineps_env: spineps {importlib.metadata.version('spineps')}, TPTBox {importlib.metadata.version('tptbox')}, "
      f"antspyx {importlib.metadata.version('antspyx')}, nnunetv2 {importlib.metadata.version('nnunetv2')}, "
      f"torch {torch.__version__} (CPU); no torchvision, no timm")
PY
ready || { echo "spineps_env: $DIR does not hold the pinned versions" >&2; exit 1; }
echo "spineps_env: $DIR is ready"
