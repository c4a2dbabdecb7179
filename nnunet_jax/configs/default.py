"""The one training/evaluation config: every seed flag (docs/reference.md §10) with the seed's default, plus
ours.

``train.py`` maps its absl flags (same names) onto this; experiment overlays are Python files passed with
``--config`` whose fields can be overridden on the command line (``--config.learning_rate=3e-4``).
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Seed defaults (March 2021 nnU-Net) and our additions, in one flat ConfigDict."""
    c = ml_collections.ConfigDict()
    # --- seed flags (names and defaults users know) ---
    c.exec_mode = "train"  # train | evaluate (predict lives in predict.py)
    c.data = "/data"  # preprocessed folder (holding plan.json) or its parent holding <task>_<dim>d/
    c.results = "/results"
    c.logname = "logs.json"
    c.task = "01"
    c.gpus = 0  # 0: every visible device; n: the first n local devices
    c.learning_rate = 1e-3
    c.gradient_clip_val = 0.0
    c.negative_slope = 0.01
    c.tta = False
    c.amp = False
    c.benchmark = False
    c.deep_supervision = False
    c.drop_block = False
    c.attention = False
    c.residual = False
    c.focal = False
    c.sync_batchnorm = False  # no-op: under jit batch statistics are global already
    c.save_ckpt = False  # seed: save checkpoints; ours always keeps `last`, this adds nothing but is accepted
    c.nfolds = 5
    c.seed = 1
    c.skip_first_n_eval = 0
    c.ckpt_path = ""
    c.fold = 0
    c.patience = 100
    c.lr_patience = 70
    c.batch_size = 2  # per device, as in the seed (per GPU)
    c.val_batch_size = 4
    c.steps = ()  # multistep milestones (epochs)
    c.profile = False
    c.momentum = 0.99
    c.weight_decay = 1e-4
    c.save_preds = False
    c.dim = 3
    c.resume_training = False
    c.factor = 0.3
    c.num_workers = 8
    c.min_epochs = 30
    c.max_epochs = 10000
    c.warmup = 5  # seed: benchmark warm-up batches
    c.norm = "instance"
    c.nvol = 1
    c.data2d_dim = 3
    c.oversampling = 0.33
    c.overlap = 0.5
    c.affinity = "socket_unique_interleaved"  # accepted, no effect (CPU pinning is the launcher's job)
    c.scheduler = "none"  # none | multistep | cosine | plateau
    c.optimizer = "radam"  # radam | adam | sgd
    c.blend = "gaussian"
    c.train_batches = 0
    c.test_batches = 0
    # --- ours ---
    c.filters = ()  # override of the per-level filters of the plan's topology (tiny nets, tests)
    c.preset = "nnunet"  # nnunet | resenc_m | resenc_l | resenc_xl (nnU-Net v2's ResEnc presets)
    c.brats = False  # newer reference: 3 sigmoid region outputs (WT, TC, ET), region loss and Dice
    c.amp_dtype = "bf16"  # bf16 | fp16 (fp16 uses dynamic loss scaling)
    c.deep_supr_num = 2
    c.lr_warmup_epochs = 0  # linear per-step learning-rate warm-up over this many epochs (0: none)
    c.ckpt_every_steps = 0  # also save `last` every n steps inside an epoch (0: at epoch ends only)
    c.val_cases = 0  # validate on the first n cases of the fold only (0: all)
    c.progress = True  # tqdm progress bar on process 0
    c.coordinator_address = ""  # multi-host: host:port of process 0 (empty: auto-detect or single process)
    c.num_processes = 0
    c.process_id = -1
    return c
