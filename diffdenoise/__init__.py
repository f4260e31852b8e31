"""diffdenoise: self-supervised medical image denoising with conditional diffusion models.

Stages (paper: DiffDenoise, Demir et al.): a blind-spot network (BSN) gives a noise-free but
detail-poor estimate x_c; a diffusion model trained on the noisy images conditioned on x_c; stabilized
reverse diffusion sampling (SRDS) averages DDIM samples from eps and -eps; a NAFNet student distils SRDS.
"""

__version__ = "0.1.0"
