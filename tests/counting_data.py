"""The embedded digits task with a prepare_data that records who calls it (tests of "data prepared once per
job"): each call appends this process's rank to the file $THAWLAB_TEST_PREPARE_LOG. Imported by name
(data._target_=counting_data.CountingDigits) in job processes that have tests/ on their PYTHONPATH."""
from __future__ import annotations

import os
import time

from thawlab.data.digits import DigitsTarget


class CountingDigits(DigitsTarget):
    def prepare_data(self):
        time.sleep(1.0)  # a slow download: ranks that did not wait for it would set up before it ends
        with open(os.environ["THAWLAB_TEST_PREPARE_LOG"], "a") as f:
            f.write(f"prepare {os.environ.get('RANK', '0')} {time.time()}\n")

    def setup(self, stage=None):
        with open(os.environ["THAWLAB_TEST_PREPARE_LOG"], "a") as f:
            f.write(f"setup {os.environ.get('RANK', '0')} {time.time()}\n")
        super().setup(stage)
