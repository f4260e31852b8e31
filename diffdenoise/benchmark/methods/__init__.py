"""The benchmark's methods: ``METHODS``, one line a method, in the order of the report's columns.

A method is ``Method(label, kind, fit)`` (``base.py``); its ``fit`` lives in the module of its family. To add one,
write its ``fit(train_noisy, workdir, settings) -> denoiser`` in a module here and add its line below; a method
read from the case's DiffDenoise pipeline run needs no module, only a line with its ``StageFit``.
"""

from diffdenoise.baselines import denoise_bm3d, denoise_nlm, denoise_tv
from diffdenoise.benchmark.methods.base import KINDS, Denoiser, Fitted, FitSettings, Method
from diffdenoise.benchmark.methods.classical import fit_filter, fit_input
from diffdenoise.benchmark.methods.deepinv_peers import fit_deepinv, peers_unavailable
from diffdenoise.benchmark.methods.pipeline_run import ITERATIONS, StageFit, bsn_overlay
from diffdenoise.benchmark.methods.self_supervised import fit_neighbor2neighbor, fit_noise2self
from diffdenoise.benchmark.methods.supervised import fit_supervised

METHODS: dict[str, Method] = {
    "noisy": Method("noisy input", "input", fit_input),
    "nlm": Method("NLM", "classical", fit_filter(denoise_nlm)),
    "tv": Method("TV", "classical", fit_filter(denoise_tv)),
    "bm3d": Method("BM3D", "classical", fit_filter(denoise_bm3d), requires=("bm3d",)),
    "noise2self": Method("Noise2Self", "self-supervised", fit_noise2self),
    "neighbor2neighbor": Method("Neighbor2Neighbor", "self-supervised", fit_neighbor2neighbor),
    "deepinv_r2r": Method("deepinv R2R (GR2R)", "self-supervised", fit_deepinv("r2r"), unavailable=peers_unavailable),
    "deepinv_n2n": Method("deepinv Neighbor2Neighbor", "self-supervised", fit_deepinv("n2n"),
                          unavailable=peers_unavailable),
    "deepinv_sure": Method("deepinv SURE", "self-supervised", fit_deepinv("sure"), unavailable=peers_unavailable),
    "bsn": Method("BSN alone (stage 1)", "self-supervised", StageFit("train_bsn", "infer_bsn", "bsn_denoiser")),
    "bsn_learned": Method("BSN, learned prior (stage 1 as Laine et al.)", "self-supervised",
                          StageFit("train_bsn", "infer_bsn", "bsn_denoiser", prior="learned")),
    "srds": Method("DiffDenoise SRDS (stages 1-3)", "diffdenoise",
                   StageFit("train_diffusion", "sample_srds", "srds_inferer")),
    "student": Method("DiffDenoise student (stage 4, iteration 1)", "diffdenoise",
                      StageFit("train_student", "inference", "inferer")),
    "student_iter2": Method("DiffDenoise student, iteration 2", "diffdenoise",
                            StageFit("train_student@2", "inference@2", "inferer")),
    "student_iter3": Method("DiffDenoise student, iteration 3", "diffdenoise",
                            StageFit("train_student@3", "inference@3", "inferer")),
    "tweedie": Method("DiffDenoise leak-free, antithetic Tweedie (stages 1-3)", "diffdenoise",
                      StageFit("train_diffusion", "sample_srds", "srds_inferer", "leak_free")),
    "student_leak_free": Method("DiffDenoise leak-free student (stage 4)", "diffdenoise",
                                StageFit("train_student", "inference", "inferer", "leak_free")),
    "supervised": Method("supervised NAFNet (clean pairs)", "supervised", fit_supervised),
}

# methods read from one DiffDenoise pipeline run per case, so stage 1 is trained once, not three times
PIPELINE_METHODS = tuple(name for name, method in METHODS.items() if isinstance(method.fit, StageFit))

__all__ = ["ITERATIONS", "KINDS", "METHODS", "PIPELINE_METHODS", "Denoiser", "FitSettings", "Fitted", "Method",
           "StageFit", "bsn_overlay"]
