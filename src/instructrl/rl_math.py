"""RL quantities for PPO, as small pure functions (tensors in, tensors/stats out).

The KL penalty against the SFT policy, reward shaping, GAE and whitening live
here and only here (InstructGPT §3.5 eq. 2; Ziegler et al. 2019; Schulman et al. 2016).
"""

from __future__ import annotations

import torch
