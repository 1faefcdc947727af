"""Evaluation of a trained model, one job a module:

- ``likelihood``: the importance-weighted log-likelihood and the validation metrics;
- ``sampling``: samples at a temperature, BatchNorm re-adjustment, reconstructions;
- ``images``: images as files and grids;
- ``latents``: latents of a dataset to a file and back, and their decoded images;
- ``fid``: FID against cached reference statistics;
- ``common``: what they share (devices, temperatures, seeded noise, eval mode).

Library functions only (the command line is ``evaluate.py``).  Every function
takes the device from its arguments or the model and keeps the model in eval
mode, so BatchNorm uses its running statistics.  The names below are the package's
API (``from hvae import evaluation as ev; ev.iw_log_likelihood(...)``).

    nll = iw_log_likelihood(model, build_loader(config, "test"), num_samples=1000, chunk=10)
    images = generate(model, 64, t=0.7, seed=0)
"""
from hvae.evaluation.common import (EvaluationError, FeatureExtractor, Temperature, eval_mode,
                                    images_of, model_device, parse_temperature, seeded)
from hvae.evaluation.fid import (FIDWeightsError, Moments, feature_stats, fid, frechet_distance,
                                 inception_extractor, loader_moments, reference_stats,
                                 sample_moments, stats_cache_path)
from hvae.evaluation.images import evenly_spaced, interleave_rows, save_images, to_uint8
from hvae.evaluation.latents import decode_latents, encode_dataset, load_latents, save_latents
from hvae.evaluation.likelihood import (DEFAULT_IW_IMAGES, iw_log_likelihood, iw_log_px,
                                        log_weights, test_metrics)
from hvae.evaluation.sampling import generate, readjust_bn, reconstruct
from hvae.objectives import bits_per_dim

__all__ = [name for name in dir() if not name.startswith("_")]
