#!/usr/bin/env bash
# Build and install the compiled deformable attention, as in the Deformable-DETR repositories:
#   cd models/ops && sh ./make.sh && python test.py
# (`make ops` from the repository root builds it in place instead.)
set -e
cd "$(dirname "$0")"
python setup.py build install
