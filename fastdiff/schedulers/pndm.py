"""Drop-in ``PNDMScheduler``: PLMS (Stable Diffusion 1.5's default, ``skip_prk_steps=True``) and the
Runge-Kutta warm-up, diffusers' constructor, API and counter semantics; one fused launch per step.

Every PNDM step is the transfer of eq. 9 of Liu et al. 2022, x' = c_s * S + c_m * M, where S is this step's
sample or the stored ``cur_sample`` and M is a fixed combination of this step's model output and up to three
stored ones. That is the coefficient row with x0 := m (written to a history slot when it is kept), the stored
outputs as H_1..H_3 and ``cur_sample`` as the corrector's starting sample (L_L = 1), so the row's C_X multiplies
S either way. ``cur_sample`` itself is written as the corrector output when a step sets it.

State is kept as diffusers keeps it (``counter``, the list ``ets``, ``cur_sample``, the Runge-Kutta sum
``cur_model_output``), but the tensors a step keeps are static device slots written by the kernel, chosen by a
rule that depends only on the state, itself a function of the call count since ``set_timesteps``; so a CUDA
graph of the whole loop replays it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import numpy as np
import torch

from .. import coefs
from ..reference.pndm import plms_combine, pndm_transfer, prk_combine
from ..schedules import TIMESTEP_SPACINGS, alphas_cumprod_from_betas, check_choice, make_betas, spaced_timesteps
from ._base import SchedulerBase, SchedulerOutput, StepPlan
from ._registry import register
from ._sigma import SIGMA_BETA_SCHEDULES
from .ddpm import add_noise_train_timesteps

PNDM_PREDICTION_TYPES = ("epsilon", "v_prediction")

# weights of the PLMS combinations over their operands, oldest first (plms_combine's formulas)
_PLMS_WEIGHTS = {
    "first": (1.0,),
    "heun": (0.5, 0.5),
    "ab2": (-1 / 2, 3 / 2),
    "ab3": (5 / 12, -16 / 12, 23 / 12),
    "ab4": (-9 / 24, 37 / 24, -59 / 24, 55 / 24),
}


class _Move(NamedTuple):
    """One PNDM step as diffusers takes it, decided from the counters alone (no tensor is read).

    operands: what the combined model output M is made of, in the formula's order: "m" (this step's output),
    ("ets", j) (``ets[-j]`` before the step) or ("rk", k) (the k-th term of the Runge-Kutta sum)."""

    t: int  # the timestep whose alphas_cumprod the transfer starts from
    prev_t: int  # where it goes (negative: final_alpha_cumprod)
    from_cur: bool  # the transfer starts from cur_sample instead of this step's sample
    formula: str  # "m" (M is this step's output), "rk4", or a PLMS formula (reference.pndm.PLMS_FORMULAS)
    operands: tuple
    weights: tuple  # each operand's weight in M
    ets_truncate: bool = False  # ets = ets[-3:] first (PLMS)
    ets_append: bool = False  # this step's output joins ets
    rk_add: Optional[float] = None  # this step's output joins the Runge-Kutta sum with this weight
    rk_reset: bool = False
    cur: str = "keep"  # cur_sample afterwards: "keep", "set" (this step's sample) or "clear"

    @property
    def stores(self) -> bool:
        return self.ets_append or self.rk_add is not None

    def row_key(self) -> tuple:
        """(t, prev_t, weight of this step's output, weights of the stored operands): all the row depends on."""
        w_m = sum(w for w, o in zip(self.weights, self.operands) if o == "m")
        return (self.t, self.prev_t, w_m, tuple(w for w, o in zip(self.weights, self.operands) if o != "m"))


class _Counts(NamedTuple):
    """The part of the state a move depends on: what the normal loop's rows are simulated from."""

    counter: int
    n_ets: int
    rk: tuple  # the Runge-Kutta sum's weights
    has_cur: bool

    def after(self, move: _Move) -> _Counts:
        n_ets = min(self.n_ets, 3) if move.ets_truncate else self.n_ets
        rk = () if move.rk_reset else self.rk
        return _Counts(
            self.counter + 1,
            n_ets + move.ets_append,
            rk + ((move.rk_add,) if move.rk_add is not None else ()),
            {"set": True, "clear": False}.get(move.cur, self.has_cur),
        )


@register(presets={"pndm": ({}, {}), "plms": ({"skip_prk_steps": True}, {})})
class PNDMScheduler(SchedulerBase):
    """Pseudo numerical methods for diffusion models (Liu et al. 2022), as diffusers' ``PNDMScheduler``: the
    Runge-Kutta warm-up (F-PNDM, 12 model calls over the first 4 intervals) then linear multistep steps, or with
    ``skip_prk_steps=True`` PLMS from the start (CompVis' PLMS sampler, Stable Diffusion 1.5).

    Same constructor arguments and defaults as diffusers 0.42; ``step``, ``step_prk`` and ``step_plms`` take
    diffusers' arguments plus ``guidance_scale`` / ``guidance_rescale`` (a doubled batch guided inside the fused
    kernel; the guided output is what the history keeps) and accept ``generator`` / ``noise_seed`` for the
    common loop's sake (PNDM draws no noise). ``counter``, ``ets``, ``cur_sample`` and ``cur_model_output``
    behave as diffusers' and may be set by hand as diffusers' tests do; one difference: the tensors in ``ets``
    and ``cur_sample`` are copies in static buffers that later steps reuse once they are dropped (diffusers keeps
    the tensors passed in), so clone one to keep it.
    """

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, list]] = None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        *,
        backend: Optional[str] = None,
    ):
        self._register_config(locals(), backend)
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, schedules=SIGMA_BETA_SCHEDULES
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = 4  # F-PNDM: the Runge-Kutta warm-up spans the first 4 intervals
        self.num_inference_steps = None
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None
        self._tables, self._device_cache = {}, {}
        self.cur_sample = None
        self._reset_loop_state()

    # ------------------------------------------------------------------ schedule

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """The timesteps of ``num_inference_steps`` model calls' worth of intervals: with the warm-up, 12
        Runge-Kutta calls over the last 4 intervals (each interval's midpoint twice) then one PLMS call per
        remaining interval; with ``skip_prk_steps`` one call per interval plus a second call at the first
        interval's end (the Heun step that starts PLMS). Resets ``counter``, ``ets`` and ``cur_model_output``."""
        cfg = self.config
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        if not cfg.skip_prk_steps and num_inference_steps < self.pndm_order:
            raise ValueError(
                f"`num_inference_steps`={num_inference_steps} is too few for the Runge-Kutta warm-up, which spans "
                f"{self.pndm_order} intervals; pass at least {self.pndm_order} or skip_prk_steps=True"
            )
        T = cfg.num_train_timesteps
        # ascending, as diffusers' `_timesteps`
        ts = spaced_timesteps(T, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset)[::-1].copy()
        self.num_inference_steps = num_inference_steps
        if cfg.skip_prk_steps:
            self.prk_timesteps = np.array([])
            self.plms_timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        else:
            self.prk_timesteps = _prk_timesteps(ts[-self.pndm_order :], T // num_inference_steps // 2)
            self.plms_timesteps = ts[:-3][::-1].copy()
        schedule = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        # the tables read the schedule, its warm-up length, the step count and the config: the same keep the caches
        # (rows, the history slots and cur_sample's buffer, which every loop writes before it reads them)
        self._set_schedule(schedule, device, fingerprint=repr((len(self.prk_timesteps), num_inference_steps)).encode())
        # the loop's moves and rows depend on the schedule and these settings only: a loop calling set_timesteps
        # before each batch reuses the first schedule's (simulating the loop costs more than its steps' Python)
        fingerprint = (schedule.tobytes(), len(self.prk_timesteps), num_inference_steps, cfg.skip_prk_steps, T)
        memo = self.__dict__.setdefault("_moves_memo", {})
        if fingerprint not in memo:
            if len(memo) >= 8:
                memo.clear()
            memo[fingerprint] = (self._normal_rows(), {})
        self._row_index, self._decided = memo[fingerprint]

    def _reset_loop_state(self) -> None:
        # diffusers resets these in set_timesteps and keeps cur_sample
        self.counter = 0
        self.ets = []
        self._rk = []  # the Runge-Kutta sum as (weight, stored output) terms

    @property
    def cur_model_output(self):
        """The Runge-Kutta stages' running sum (0 outside a warm-up interval), computed from the stored outputs
        in diffusers' order."""
        if not self._rk:
            return 0
        acc = 0
        for weight, output in self._rk:
            acc = acc + weight * output
        return acc

    @cur_model_output.setter
    def cur_model_output(self, value) -> None:
        self._rk = [] if isinstance(value, (int, float)) and value == 0 else [(1.0, value)]

    # ------------------------------------------------------------------ moves

    def _move(self, kind: str, counts: _Counts, t_passed: int) -> _Move:
        return self._prk_move(counts, t_passed) if kind == "prk" else self._plms_move(counts, t_passed)

    def _prk_move(self, c: _Counts, t_passed: int) -> _Move:
        """diffusers' step_prk: stage counter % 4 of the interval that starts at prk_timesteps[counter // 4 * 4];
        the stages' outputs are summed 1/6, 1/3, 1/3, 1/6 and the fourth stage transfers with the sum."""
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_t = t_passed - (0 if c.counter % 2 else half)
        start = c.counter // 4 * 4
        if start >= len(self.prk_timesteps):
            raise IndexError(
                f"step_prk called at counter={c.counter}, past the {len(self.prk_timesteps)} Runge-Kutta steps of "
                "this schedule"
            )
        t = int(self.prk_timesteps[start])
        stage = c.counter % 4
        from_cur = stage != 0 and c.has_cur
        if stage == 0:
            return _Move(t, prev_t, False, "m", ("m",), (1.0,), ets_append=True, rk_add=1 / 6, cur="set")
        if stage in (1, 2):
            return _Move(t, prev_t, from_cur, "m", ("m",), (1.0,), rk_add=1 / 3)
        operands = tuple(("rk", k) for k in range(len(c.rk))) + ("m",)
        return _Move(t, prev_t, from_cur, "rk4", operands, c.rk + (1 / 6,), rk_reset=True)

    def _plms_move(self, c: _Counts, t_passed: int) -> _Move:
        """diffusers' step_plms: Adams-Bashforth over the kept outputs; the second call (counter 1) re-evaluates
        the first interval's start with the average of both outputs (Heun), from the first call's sample."""
        cfg = self.config
        if not cfg.skip_prk_steps and c.n_ets < 3:
            raise ValueError(
                f"{type(self).__name__}.step_plms can only be run after the scheduler has run 12 Runge-Kutta steps "
                f"(step_prk) to fill `ets`; it holds {c.n_ets} model outputs, PLMS needs 3 (or skip_prk_steps=True)"
            )
        ratio = cfg.num_train_timesteps // self.num_inference_steps
        if c.counter != 1:
            kept = min(c.n_ets, 3)
            operands = tuple(("ets", j) for j in range(kept, 0, -1)) + ("m",)  # ets after the append, oldest first
            t, prev_t, extra = t_passed, t_passed - ratio, {"ets_truncate": True, "ets_append": True}
        else:
            operands = tuple(("ets", j) for j in range(c.n_ets, 0, -1))
            t, prev_t, extra = t_passed + ratio, t_passed, {}
        n = len(operands)
        if n == 1 and c.counter == 0:
            return _Move(t, prev_t, False, "first", ("m",), (1.0,), cur="set", **extra)
        if n == 1 and c.counter == 1:
            if not c.has_cur:
                raise ValueError("the second PLMS step starts from `cur_sample`, which is None")
            return _Move(t, prev_t, True, "heun", ("m", ("ets", 1)), (0.5, 0.5), cur="clear", **extra)
        formula = {2: "ab2", 3: "ab3"}.get(n, "ab4")
        if formula == "ab4" and n < 4:
            raise IndexError(f"the 4th-order PLMS step needs 4 model outputs; `ets` holds {c.n_ets}")
        return _Move(t, prev_t, False, formula, operands[-4:], _PLMS_WEIGHTS[formula], **extra)

    def _decide(self, kind: str, t: int) -> tuple:
        """(move, its row key, its table row or None) for this call, memoized per schedule by (kind, counts,
        timestep): a step of a loop pays one dict lookup instead of building its move (the step's Python is what a
        launch-bound eager step at Stable Diffusion latent size spends its time on)."""
        memo_key = (kind, self._counts(), t)
        decided = self._decided.get(memo_key)
        if decided is None:
            move = self._move(kind, memo_key[1], t)
            key = move.row_key()
            decided = self._decided[memo_key] = (move, key, self._row_index.get(key))
        return decided

    def _counts(self) -> _Counts:
        return _Counts(self.counter, len(self.ets), tuple(w for w, _ in self._rk), self.cur_sample is not None)

    def _normal_rows(self) -> dict:
        """{row key: table row} for the moves of a loop over ``self.timesteps`` from a fresh state."""
        T = self.config.num_train_timesteps
        counts, keys = _Counts(0, 0, (), False), {}
        for t in self._timestep_values.tolist():
            move = self._move(self._kind(counts.counter), counts, t)
            if -T <= move.t < T and move.prev_t < T:  # an index diffusers would fail on raises at its step instead
                keys.setdefault(move.row_key(), len(keys))
            counts = counts.after(move)
        return keys

    def _kind(self, counter: int) -> str:
        """What diffusers' ``step`` calls at ``counter``: step_prk during the warm-up, else step_plms."""
        return "prk" if counter < len(self.prk_timesteps) and not self.config.skip_prk_steps else "plms"

    # ------------------------------------------------------------------ coefficients

    def _transfer(self, t, prev_t) -> tuple:
        """(c_s, c_m) float64 arrays with x' = c_s * S + c_m * M (eq. 9) for integer arrays ``t``, ``prev_t``;
        the float32 quantities formed with diffusers' operations, one vectorized pass per table."""
        acp = self.alphas_cumprod.cpu()
        t, prev_t = torch.as_tensor(t, dtype=torch.int64), torch.as_tensor(prev_t, dtype=torch.int64)
        a_t = acp[t]
        a_p = torch.where(prev_t >= 0, acp[prev_t.clamp(min=0)], self.final_alpha_cumprod.cpu())
        b_t, b_p = 1 - a_t, 1 - a_p
        c_s = ((a_p / a_t) ** 0.5).double()
        denom = a_t * b_p**0.5 + (a_t * b_t * a_p) ** 0.5
        k = (a_p - a_t).double() / denom.double()
        if self.config.prediction_type == "v_prediction":  # M = sqrt(abar_t) v + sqrt(1 - abar_t) S
            # folded into S's coefficient, c_s - k sqrt(1 - abar_t) cancels two terms of up to sqrt(abar_prev /
            # abar_t) (4,700 at t = 999 of a cosine schedule, abar = 2.4e-9): formed from float32 c_s and k it
            # kept their rounding times that (1.6e-4 relative off the float64 truth where diffusers, cancelling
            # the same at run time, happened to be 1.7e-5 off), so the fold is formed in float64 throughout
            a_t, a_p = a_t.double(), a_p.double()
            b_t, b_p = 1 - a_t, 1 - a_p
            k = (a_p - a_t) / (a_t * b_p**0.5 + (a_t * b_t * a_p) ** 0.5)
            c_s, k = (a_p / a_t) ** 0.5 - k * b_t**0.5, k * a_t**0.5
        return c_s.numpy(), -k.numpy()

    def _coef_rows(self, keys) -> np.ndarray:
        """The rows of moves (their ``row_key``s): x0 := m (kept when the move stores it), C_X multiplies S (the
        sample, or the corrector's starting sample cur_sample with L_L = 1), C_0 and H_k the weights of M."""
        c_s, c_m = self._transfer([k[0] for k in keys], [k[1] for k in keys])
        rows = np.zeros((len(keys), coefs.NCOEF))
        rows[:, coefs.X_S], rows[:, coefs.A_M], rows[:, coefs.L_L] = 1.0, 1.0, 1.0
        rows[:, coefs.C_X] = c_s
        for r, (_, _, w_m, w_hist) in enumerate(keys):
            rows[r, coefs.C_0] = c_m[r] * w_m
            for k, w in zip((coefs.H_1, coefs.H_2, coefs.H_3), w_hist):
                rows[r, k] = c_m[r] * w
        return rows

    def _coef_table(self) -> np.ndarray:
        return self._coef_rows(list(self._row_index))

    # ------------------------------------------------------------------ step

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
        *,
        generator=None,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """One step: ``step_prk`` during the Runge-Kutta warm-up (``counter`` below 12), else ``step_plms``.
        ``model_output`` (B, ...) like ``sample`` (or a doubled batch with ``guidance_scale``); ``timestep`` an
        element of ``self.timesteps`` (no host sync) or an int. Returns ``SchedulerOutput`` or ``(prev_sample,)``."""
        self._check_ready()
        kind = self._kind(self.counter)
        return self._pndm_step(
            kind, model_output, timestep, sample, return_dict, guidance_scale, guidance_rescale, noise_seed
        )

    def step_prk(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
        *,
        generator=None,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """One Runge-Kutta stage (Liu et al. 2022, Algorithm 2): four calls per interval, at its start, twice at
        its midpoint and at its end, all transferred from the interval's starting sample ``cur_sample``."""
        self._check_ready()
        return self._pndm_step(
            "prk", model_output, timestep, sample, return_dict, guidance_scale, guidance_rescale, noise_seed
        )

    def step_plms(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
        *,
        generator=None,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """One linear multistep step (eq. 12): the transfer with the Adams-Bashforth combination of this and up
        to three kept model outputs. Raises ValueError without ``skip_prk_steps`` before the warm-up is done."""
        self._check_ready()
        return self._pndm_step(
            "plms", model_output, timestep, sample, return_dict, guidance_scale, guidance_rescale, noise_seed
        )

    def _pndm_step(
        self, kind, model_output, timestep, sample, return_dict, guidance_scale, guidance_rescale, noise_seed
    ):
        # noise_seed draws nothing here (PNDM is deterministic) but is checked like every scheduler's
        return self._step(
            model_output,
            timestep,
            sample,
            {"kind": kind},
            return_dict=return_dict,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            noise_seed=noise_seed,
        )

    def _locate(self, timestep) -> int:
        return self.counter  # PNDM counts calls: its PRK steps repeat timesteps

    def _plan(self, i, timestep, model_output, sample, opts) -> StepPlan:
        check_choice("prediction_type", self.config.prediction_type, PNDM_PREDICTION_TYPES)
        t = integer_timestep(self._timestep_value(timestep))
        # The plan is a function of the call and the loop state (counter, kept outputs, Runge-Kutta stages,
        # cur_sample). In a loop those are the schedule's static slots, so keyed by their identities a loop's
        # plans are made once per schedule; the plan holds the tensors it names, so their ids stay unique while
        # the entry lives. State set by hand (other tensors) just makes new entries.
        memo_key = (
            opts["kind"],
            t,
            self.counter,
            tuple(map(id, self.ets)),
            tuple((w, id(o)) for w, o in self._rk),
            id(self.cur_sample),
            sample.shape,
            sample.dtype,
            sample.device,
            model_output.dtype,
        )
        plans = self._cached(("plans",), dict)
        plan = plans.get(memo_key)
        if plan is None:
            if len(plans) >= 4 * len(self._timestep_values) + 64:  # bounded: hand-set state keeps making entries
                plans.clear()
            plan = plans[memo_key] = self._make_plan(i, t, model_output, sample, opts)
        return plan

    def _make_plan(self, i, t, model_output, sample, opts) -> StepPlan:
        move, key, row = self._decide(opts["kind"], t)
        operands = [None if o == "m" else self._operand(o) for o in move.operands]
        hist = tuple(o for o in operands if o is not None)
        start = self.cur_sample if move.from_cur else None
        m_dtype = model_output.dtype
        slot = self._free_slot(move, sample.shape, m_dtype, sample.device) if move.stores else None
        cur = None
        if move.cur == "set":
            cur_key = ("cur_sample", sample.shape, sample.dtype, sample.device)
            cur = self._cached(cur_key, lambda: torch.empty(sample.shape, dtype=sample.dtype, device=sample.device))
        fusable = len(hist) <= 3 and all(_like(t, sample) for t in hist + ((start,) if start is not None else ()))
        return StepPlan(
            i,
            row=row,
            coef=None if row is not None or not fusable else self._custom_row(key, sample.device),
            hist=hist,
            x0_out=slot,
            write_x0=slot is not None,
            x0_dtype=m_dtype,
            last=start,
            corr_out=cur,
            # more than three stored outputs, or stored tensors unlike the sample (set by hand in `ets`), do not
            # fit the row's three history inputs: step_plms at counter 1 after a full `ets` (ab4 without this
            # step's output) is the one such move diffusers' own tests make
            reference_only=not fusable,
            state={"move": move, "operands": operands, "start": start},
        )

    def _operand(self, source) -> torch.Tensor:
        kind, k = source
        return self.ets[-k] if kind == "ets" else self._rk[k][1]

    def _free_slot(self, move: _Move, shape, dtype, device) -> torch.Tensor:
        """The lowest static slot for (shape, dtype, device) that no kept output still uses after this step's
        truncation: a function of the state alone, so a graph replay picks the same slots. A PLMS loop uses 4
        (3 kept outputs and this step's), a warm-up 5 (3 interval starts kept in ets, 2 midpoint stages)."""
        kept = self.ets[-3:] if move.ets_truncate else self.ets
        live = {id(t) for t in kept} | {id(t) for _, t in ([] if move.rk_reset else self._rk)}
        slots = self._cached(("slots", shape, dtype, device), list)
        for buf in slots:
            if id(buf) not in live:
                return buf
        slots.append(torch.empty(shape, dtype=dtype, device=device))
        return slots[-1]

    def _custom_row(self, key, device) -> torch.Tensor:
        """A move outside the normal loop (a timestep off the schedule, state set by hand): its own cached row."""
        return self._cached(
            ("row", key, torch.device(device)),
            lambda: torch.from_numpy(self._coef_rows([key])[0].astype(np.float32)).to(device),
        )

    def _reference_step(self, plan, model_output, sample, noise, opts):
        move = plan.state["move"]
        operands = [model_output if o is None else o for o in plan.state["operands"]]
        if move.formula == "m":
            combined = model_output
        elif move.formula == "rk4":
            combined = prk_combine(list(zip(move.weights[:-1], operands[:-1])), model_output)
        else:
            combined = plms_combine(move.formula, operands)
        start = plan.state["start"] if plan.state["start"] is not None else sample
        prev = pndm_transfer(
            start,
            combined,
            move.t,
            move.prev_t,
            alphas_cumprod=self.alphas_cumprod,
            final_alpha_cumprod=self.final_alpha_cumprod,
            prediction_type=self.config.prediction_type,
        )
        if plan.x0_out is not None:
            plan.x0_out.copy_(model_output)
        if plan.corr_out is not None:
            plan.corr_out.copy_(sample)
        return prev, None

    def _advance(self, plan) -> None:
        move = plan.state["move"]
        kept = plan.x0_out
        if move.ets_truncate:
            self.ets = self.ets[-3:]
        if move.ets_append:
            self.ets.append(kept)
        if move.rk_reset:
            self._rk = []
        if move.rk_add is not None:
            self._rk.append((move.rk_add, kept))
        if move.cur == "set":
            self.cur_sample = plan.corr_out
        elif move.cur == "clear":
            self.cur_sample = None
        self.counter += 1

    def _output(self, prev, x0, return_dict: bool):
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    # ------------------------------------------------------------------ diffusers' other public methods

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples, noise, timesteps, *, noise_seed=None):
        """q(x_t | x_0) at training timesteps, one launch; see ``DDPMScheduler.add_noise``."""
        return add_noise_train_timesteps(self, original_samples, noise, timesteps, noise_seed)

    def _offset_tensor(self, i: int, device) -> torch.Tensor:
        if self.timesteps is None:  # add_noise(noise_seed=...) before set_timesteps (timesteps is None, as diffusers')
            return self._cached(("offset", i, torch.device(device)), lambda: torch.tensor([i], device=device))
        return super()._offset_tensor(i, device)


def _prk_timesteps(last: np.ndarray, half: int) -> np.ndarray:
    """The warm-up's timesteps, descending: for each of the last 4 intervals (t, t + half) ascending, the last
    value dropped, every value doubled and the ends trimmed, so each interval's start is called once, its
    midpoint twice and its end once, the end shared with the next interval's start."""
    points = np.stack([last, last + half], axis=1).reshape(-1)[:-1]
    return np.repeat(points, 2)[1:-1][::-1].copy()


def integer_timestep(value) -> int:
    """A timestep's value (a Python number) as an int; a non-integer one raises (diffusers indexes with it)."""
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"`timestep` must be an integer timestep, got {value!r}")
    return int(value)


def _like(t, sample: torch.Tensor) -> bool:
    """Whether a stored tensor can be a kernel input next to ``sample``: a float tensor of its shape and device."""
    return (
        isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == sample.shape and t.device == sample.device
    )
