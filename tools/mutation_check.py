"""Hand-run mutation check: plant one plausible bug at a time, run the tests that
should catch it, report which fail.

    python tools/mutation_check.py                  # every mutant below
    python tools/mutation_check.py --only flow_log_det_sign,iw_nelbo_summed
    python tools/mutation_check.py --list
    python tools/mutation_check.py --ref 4246eff --tests tests/test_model.py \
        --only flow_log_det_sign                      # a mutant against an older suite

The repository (tracked and untracked, non-ignored files, or ``git archive REF``)
is copied once into a scratch folder; each mutant replaces one exact snippet of
one file there (it must occur exactly once), runs its tests with the scratch copy
first on PYTHONPATH, and restores the file.  The working tree is never touched.
A mutant is *killed* when at least one of its tests fails.  See docs/TESTING.md.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hvae import cli  # noqa: E402


@dataclass
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: list[str]
    what: str


EV, MODEL, DIST = "tests/test_evaluation.py", "tests/test_model.py", "tests/test_distributions.py"
OBJ = "tests/test_objectives.py"
NVAE_REF = "tests/test_nvae_import.py"
GRAPH = "tests/test_graphed_step.py"
SYNC_BN = "tests/test_sync_bn.py"

MUTANTS = [
    Mutant("flow_log_det_sign", "hvae/model/nvae.py",
           "log_q = log_q - log_det", "log_q = log_q + log_det",
           [f"{MODEL}::test_flow_log_q_is_base_density_minus_jacobian_log_det",
            f"{EV}::test_iw_with_flows_matches_log_likelihood_by_quadrature"],
           "flow log-det enters log q with the wrong sign"),
    Mutant("iw_nelbo_summed", "hvae/evaluation/likelihood.py",
           "torch.cat(nelbo, dim=1).mean(dim=1)", "torch.cat(nelbo, dim=1).sum(dim=1)",
           [f"{EV}::test_iw_approaches_exact_from_below_as_k_grows_on_linear_gaussian",
            f"{EV}::test_chunks_keep_each_image_with_its_own_weights"],
           "IW pass's NELBO summed over the K samples instead of averaged"),
    Mutant("iaf_log_det_zero", "hvae/model/flows.py",
           "return z, log_scale.sum(dim=(2, 3))", "return z, 0.0 * log_scale.sum(dim=(2, 3))",
           [f"{MODEL}::test_flow_cell_jacobian_is_triangular_with_matching_log_det",
            f"{MODEL}::test_flow_log_q_is_base_density_minus_jacobian_log_det",
            f"{EV}::test_iw_with_flows_matches_log_likelihood_by_quadrature"],
           "affine IAF cell reports log-det 0"),
    Mutant("iw_without_log_k", "hvae/evaluation/likelihood.py",
           "log_px = torch.logsumexp(log_w, dim=1) - math.log(num_samples)",
           "log_px = torch.logsumexp(log_w, dim=1)",
           [f"{EV}::test_iw_converges_to_exact_log_likelihood_on_linear_gaussian",
            f"{EV}::test_iw_approaches_exact_from_below_as_k_grows_on_linear_gaussian",
            f"{EV}::test_iw_with_flows_matches_log_likelihood_by_quadrature"],
           "logsumexp of the log weights without - log K"),
    Mutant("dml_edge_bins", "hvae/distributions.py",
           "torch.where(kk == self.num_values - 1, highest, interior)",
           "torch.where(kk >= self.num_values - 2, highest, interior)",
           [DIST], "DML: the top two bins both get the upper tail mass"),
    Mutant("eq2_kl_drop_log_ratio", "hvae/distributions.py",
           "torch.addcmul(0.5 * torch.expm1(2.0 * r) - r, u, u, value=0.5)",
           "torch.addcmul(0.5 * torch.expm1(2.0 * r), u, u, value=0.5)",
           [DIST, f"{MODEL}::test_kl_matches_closed_form"],
           "Eq. 2 KL without the - log(dsigma) term"),
    Mutant("eq2_kl_mu_not_scaled", "hvae/distributions.py",
           "u = d * torch.exp(-ls_p)", "u = d",
           [DIST, f"{MODEL}::test_kl_matches_closed_form"],
           "Eq. 2 KL: dmu^2 not divided by sigma_p^2"),
    Mutant("tanh_log_det_half", "hvae/distributions.py",
           "log_det = _sum_per_item(2.0 * (math.log(2.0) - ax - F.softplus(-2.0 * ax)))",
           "log_det = _sum_per_item(math.log(2.0) - ax - F.softplus(-2.0 * ax))",
           [DIST], "Tanh log-det missing its factor 2"),
    Mutant("dequantize_log_det_sign", "hvae/distributions.py",
           "torch.full((x.shape[0],), -_num_dims(x) * math.log(self.num_bins),",
           "torch.full((x.shape[0],), _num_dims(x) * math.log(self.num_bins),",
           [DIST], "Dequantize forward log-det +D log(bins) instead of -D log(bins)"),
    Mutant("balance_not_detached", "hvae/objectives.py",
           "    kl = kl.detach()\n    raw = ", "    raw = ",
           [OBJ], "KL balancing coefficients not detached"),
    Mutant("balance_not_normalised", "hvae/objectives.py",
           "return raw / raw.mean()", "return raw",
           [OBJ], "KL balancing coefficients not normalised to mean 1"),
    Mutant("balance_direction", "hvae/objectives.py",
           "counts[s] / 4.0 ** s for s", "counts[s] * 4.0 ** s for s",
           [OBJ], "balancing weight proportional to the group size (the paper's typo)"),
    Mutant("bpd_padded_size", "hvae/model/nvae.py",
           "self.data_dims = cfg.in_channels * cfg.image_size ** 2",
           "self.data_dims = cfg.in_channels * cfg.padded_size ** 2",
           [f"{MODEL}::test_shapes_and_dims", f"{MODEL}::test_mnist_likelihood_counts_real_pixels_only",
            f"{EV}::test_bits_per_dim_counts_unpadded_mnist_pixels"],
           "bits/dim divided by the padded 32x32 size"),
    Mutant("power_iteration_unnormalised", "hvae/objectives.py",
           "            _normalize_rows_(u_flat, u_ids, u_rows)\n",
           "            pass  # u left unnormalised\n",
           [OBJ], "spectral power iteration: u not normalised"),
    Mutant("dml_temperature_divides", "hvae/distributions.py",
           "noise = t * scale * (torch.log(u) - torch.log1p(-u))",
           "noise = scale / t * (torch.log(u) - torch.log1p(-u))",
           [DIST, f"{MODEL}::test_dml_output_temperature_shrinks_spread_around_the_t0_sample"],
           "pixel logistic temperature applied as scale / t"),
    Mutant("normal_temperature_divides", "hvae/distributions.py",
           "return self.mu + (t * self.sigma) * eps", "return self.mu + (self.sigma / t) * eps",
           [DIST, f"{MODEL}::test_sample_temperature_scales_each_groups_prior_sigma"],
           "latent temperature applied as sigma / t"),
    Mutant("latent_temperature_divides", "hvae/model/nvae.py",
           "z = p_mu + (t * torch.exp(p_log_sigma))", "z = p_mu + (torch.exp(p_log_sigma) / t)",
           [f"{MODEL}::test_sample_temperature_scales_each_groups_prior_sigma"],
           "the model's prior sampling applies its temperature as sigma / t"),
    Mutant("shift_sees_own_channel", "hvae/model/flows.py",
           "deg_h[:, None] > deg_z[None, :]", "deg_h[:, None] >= deg_z[None, :]",
           [f"{MODEL}::test_shift_cell_is_raster_autoregressive_with_unit_diagonal",
            f"{MODEL}::test_flow_log_q_is_base_density_minus_jacobian_log_det"],
           "NVAE's shift cell: m_k sees z_k (not triangular, log-det no longer 0)"),
    Mutant("sigma_floor_dropped", "hvae/distributions.py",
           "y = torch.logaddexp(clamped, torch.full_like(clamped, math.log(SIGMA_FLOOR)))", "y = clamped",
           [f"{DIST}::test_nvae_normal_is_clamped_with_a_sigma_floor", NVAE_REF],
           "latent sigma without NVAE's + 0.01"),
    Mutant("up_skip_align_corners", "hvae/model/cells.py",
           'return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)',
           'return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)',
           [NVAE_REF], "up-sampling skip interpolates unlike NVAE"),
    Mutant("temperatures_reversed", "hvae/model/nvae.py",
           "t = [float(v) for v in t]", "t = [float(v) for v in t][::-1]",
           [f"{MODEL}::test_sample_temperature_scales_each_groups_prior_sigma",
            f"{EV}::test_per_group_temperatures_change_exactly_the_named_groups"],
           "per-group temperatures applied bottom group first"),
    Mutant("readjust_bn_momentum", "hvae/evaluation/sampling.py",
           "bn.momentum = None\n", "bn.momentum = 0.5\n",
           [f"{EV}::test_readjusted_bn_statistics_are_sample_averages_and_sampling_uses_them",
            f"{EV}::test_readjust_bn_changes_stats_restores_mode_and_needs_no_data"],
           "BN re-adjustment keeps an exponential average, not the mean over batches"),
    Mutant("graph_kl_weight_baked", "hvae/graphed_step.py",
           "values = StepValues(lr, kl_weight, reg_lambda, host.balancing, host.regularise)",
           "values = StepValues(lr, host.kl_weight, reg_lambda, host.balancing, host.regularise)",
           [f"{GRAPH}::test_capture_replay_bookkeeping"],
           "CUDA graphs: the KL weight enters the step as a host number, frozen at capture"),
    Mutant("graph_adamax_count_rebound", "hvae/graphed_step.py",
           "self.count.add_(keep)", "self.count = self.count + keep",
           [f"{GRAPH}::test_capture_replay_bookkeeping"],
           "CUDA graphs: Adamax's step count rebound, not updated in place (frozen under replay)"),
    Mutant("graph_skipper_streak_rebound", "hvae/step.py",
           "self.consecutive.copy_(torch.where(skip, self.consecutive + 1, 0))",
           "self.consecutive = torch.where(skip, self.consecutive + 1, 0)",
           [f"{GRAPH}::test_grad_skipper_state_advances_under_replay"],
           "CUDA graphs: the skipper's streak of outliers rebound (frozen under replay)"),
    Mutant("masked_adamax_no_bias_correction", "hvae/graphed_step.py",
           "step_size = -lr * keep / (1 - beta1 ** self.count.clamp_min(1))",
           "step_size = -lr * keep",
           [f"{GRAPH}::test_masked_adamax_is_torchs_adamax_and_a_skip_changes_nothing",
            f"{GRAPH}::test_sync_free_step_trains_as_the_eager_step"],
           "sync-free Adamax without the bias correction"),
    Mutant("skipped_gradients_leak", "hvae/graphed_step.py",
           "        self._flat_grad.masked_fill_(skip, 0.0)  # a skipped update's gradients may be NaN\n",
           "",
           [f"{GRAPH}::test_a_skipped_sync_free_step_leaves_no_trace"],
           "sync-free step: a skipped update's NaN gradients reach the Adamax moments"),
    Mutant("graph_schedules_on_host", "hvae/graphed_step.py",
           "self._scalars = torch.zeros(4, device=device)", "self._scalars = torch.zeros(4)",
           [f"{GRAPH}::test_the_sync_free_step_keeps_every_tensor_on_the_gpu"],
           "sync-free step: the schedules' scalars left on the CPU (fine there, wrong on a GPU)"),
    Mutant("graph_adamax_count_on_host", "hvae/graphed_step.py",
           "        self.count = torch.zeros((), device=device)", "        self.count = torch.zeros(())",
           [f"{GRAPH}::test_the_sync_free_step_keeps_every_tensor_on_the_gpu"],
           "sync-free Adamax: its step count on the CPU (fine there, wrong on a GPU)"),
    Mutant("ddp_skip_not_agreed", "hvae/graphed_step.py",
           "        skip = self.agree_on_skip(skip)\n", "",
           [f"{GRAPH}::test_ddp_ranks_agree_on_skips_and_stops_in_both_steps"],
           "sync-free step under DDP: each rank skips on its own decision (weights part)"),
    Mutant("ddp_stop_not_agreed", "hvae/graphed_step.py",
           '"stop": self.agree_on_stop(bool(stop_requested))', '"stop": bool(stop_requested)',
           [f"{GRAPH}::test_ddp_ranks_agree_on_skips_and_stops_in_both_steps"],
           "sync-free step under DDP: a signal stops only the rank that received it"),
    Mutant("ddp_capture_not_agreed", "hvae/graphed_step.py",
           "            if bool(failed) and error is None:", "            if False:",
           [f"{GRAPH}::test_under_ddp_every_rank_replays_or_none_does"],
           "CUDA graphs under DDP: a rank replays while another could not capture"),
    Mutant("sync_bn_local_statistics", "hvae/model/sync_bn.py",
           "        return (self.training and torch.is_grad_enabled()",
           "        return False and (self.training and torch.is_grad_enabled()",
           [f"{SYNC_BN}::test_two_ranks_normalise_as_one_process_with_the_whole_batch",
            f"{SYNC_BN}::test_sync_bn_training_keeps_every_ranks_statistics_equal"],
           "--sync_bn: each rank normalises with its own batch's statistics"),
    Mutant("sync_bn_unshifted_sums", "hvae/model/sync_bn.py",
           "        shift = self.running_mean.detach().clone().float()",
           "        shift = torch.zeros_like(self.running_mean)",
           [f"{SYNC_BN}::test_two_ranks_normalise_as_one_process_with_the_whole_batch"],
           "--sync_bn: variance from unshifted sums (cancellation when |mean| >> std)"),
    Mutant("sync_bn_biased_running_var", "hvae/model/sync_bn.py",
           "self.running_var.lerp_(var * (n / (n - 1).clamp_min(1)), momentum)",
           "self.running_var.lerp_(var, momentum)",
           [f"{SYNC_BN}::test_two_ranks_normalise_as_one_process_with_the_whole_batch"],
           "--sync_bn: the running variance without Bessel's correction"),
    Mutant("cli_nll_ignores_seed", "evaluate.py",
           "distributed=world > 1, seed=args.seed + rank))", "distributed=world > 1, seed=None))",
           [f"{EV}::test_cli_nll_subprocess_matches_the_library_for_the_same_seed"],
           "evaluate.py --mode nll ignores --seed (the state before this branch)"),
]


def copy_tree(dest: Path, ref: str | None) -> None:
    """The repository's files (or those of commit ``ref``) into ``dest``."""
    if ref:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())


def run_tests(tree: Path, tests: list[str], timeout: int) -> tuple[int, list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, [], "timeout"
    failed = sorted({m.group(1).split("::")[-1].split("[")[0]
                     for m in re.finditer(r"^FAILED (\S+)", proc.stdout, re.M)})
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return proc.returncode, failed, summary


def stale_mutants(mutants: list[Mutant], root: Path) -> list[str]:
    """What no longer applies: a snippet that does not occur exactly once in its file, or
    a named test that does not exist (library lines are reworded; rerun --check then)."""
    problems = []
    for m in mutants:
        count = (root / m.file).read_text().count(m.old)
        if count != 1 or m.old == m.new:
            problems.append(f"{m.name}: its snippet occurs {count} times in {m.file}")
        for test in m.tests:
            file, _, name = test.partition("::")
            name = name.split("[")[0]
            if name and f"def {name}(" not in (root / file).read_text():
                problems.append(f"{m.name}: no test {test}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="mutation_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated mutant names")
    p.add_argument("--list", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="only check that every snippet occurs once and every named test exists")
    p.add_argument("--ref", default=None, help="mutate this commit's files instead of the work tree")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per mutant")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    p.add_argument("--tests", nargs="+", default=None,
                   help="run these tests for every mutant instead of each mutant's own list "
                        "(e.g. whole files of an older suite with --ref)")
    args = p.parse_args(argv)
    unknown = [n for n in args.only.split(",") if n and n not in {m.name for m in MUTANTS}]
    if unknown:  # a typo would otherwise check nothing and pass
        p.error(f"--only: unknown mutant(s) {', '.join(unknown)} (--list names them)")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    if args.tests:
        chosen = [Mutant(m.name, m.file, m.old, m.new, args.tests, m.what) for m in chosen]
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.file:24s} {m.what}")
        return 0
    stale = stale_mutants(chosen, ROOT) if args.ref is None else []
    for problem in stale:
        print(f"stale: {problem}")
    if args.check or stale:  # a moved snippet would otherwise make its mutant silently n/a
        print(f"{len(chosen) - len(stale)} of {len(chosen)} mutants apply to this tree")
        return 1 if stale else 0
    rows, survivors = [], 0
    with tempfile.TemporaryDirectory(prefix="hvae-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree, args.ref)
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            rc, failed, summary = run_tests(tree, tests, args.timeout)
            print(f"baseline (no mutant): {summary}", flush=True)
            if rc != 0:
                print(f"error: the unmutated tests fail ({', '.join(failed)}); fix that first")
                return 2
        for m in chosen:
            path = tree / m.file
            original = path.read_text()
            if original.count(m.old) != 1:
                rows.append((m, "n/a", f"pattern found {original.count(m.old)} times", 0.0))
                print(f"{m.name}: pattern not found once in {m.file}, skipped", flush=True)
                continue
            path.write_text(original.replace(m.old, m.new))
            start = time.time()
            try:
                rc, failed, summary = run_tests(tree, m.tests, args.timeout)
            finally:
                path.write_text(original)
            killed = rc != 0
            survivors += not killed
            rows.append((m, "killed" if killed else "SURVIVED",
                         ", ".join(failed) or summary, time.time() - start))
            print(f"{m.name}: {'killed' if killed else 'SURVIVED'} ({summary})", flush=True)
    print("\n| mutant | file | change | result | failing tests |\n|---|---|---|---|---|")
    for m, result, detail, _ in rows:
        print(f"| {m.name} | {m.file} | {m.what} | {result} | {detail} |")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
