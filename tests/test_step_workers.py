"""The step-time workers of tools/compare_step_time.py and tools/compare_official_step.py (their batch has labels
1-5): a prelude runs first, one worker saves the model it built and another loads it strictly, both time steps."""
from pathlib import Path

import pytest

from tools.compare_step_time import start_worker, timed

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--backbone resnet18 --backbone_from_scratch --hidden_dim 32 --nheads 2 --enc_layers 1 --dec_layers 1 "
         "--dim_feedforward 32 --num_queries 5 --num_classes 6 --device cpu --msda_impl pytorch")


@pytest.mark.slow
def test_workers_prelude_save_and_strict_load(tmp_path):
    weights, marker = tmp_path / "weights.pth", tmp_path / "prelude_ran"
    saver = start_worker(ROOT, FLAGS, 1, (64, 64), 1, {"STEP_WORKER_SAVE": str(weights),
                                                       "STEP_WORKER_PRELUDE": f"open({str(marker)!r}, 'w').close()"})
    loader = start_worker(ROOT, FLAGS, 1, (64, 64), 1, {"STEP_WORKER_LOAD": str(weights)})
    try:
        assert timed(saver, 1) > 0 and timed(loader, 1) > 0
    finally:
        for proc in (saver, loader):
            proc.stdin.close()
            proc.wait()
    assert weights.is_file() and marker.is_file() and loader.returncode == 0
    with pytest.raises(RuntimeError, match="failed to build"):  # a load that is not strict-compatible fails
        start_worker(ROOT, FLAGS.replace("--hidden_dim 32", "--hidden_dim 16"), 1, (64, 64), 1,
                     {"STEP_WORKER_LOAD": str(weights)})
