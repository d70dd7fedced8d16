#!/usr/bin/env bash
# The labeling tools the round-trip tests import ddetr's output with, each in its own virtualenv
# beside the checkout, since each pins packages of its own (Datumaro: opencv < 5 and pillow 12;
# Label Studio: numpy, Django, ...): .venv-datumaro (~0.6 GB, ~1 min) and .venv-label-studio
# (~1 GB, ~2 min). The tests find them there (or where DDETR_DATUMARO_PYTHON / DDETR_LABEL_STUDIO
# point).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-datumaro/bin/python ] || python3 -m venv .venv-datumaro
.venv-datumaro/bin/python -m pip install -q datumaro==1.13.12
[ -x .venv-label-studio/bin/python ] || python3 -m venv .venv-label-studio
.venv-label-studio/bin/python -m pip install -q --upgrade pip
.venv-label-studio/bin/python -m pip install -q "label-studio==1.23.*" "label-studio-sdk>=2,<3"
