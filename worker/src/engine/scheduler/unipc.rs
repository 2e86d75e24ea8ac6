//! The UniPC multistep sampler, as diffusers' `UniPCMultistepScheduler` (0.42,
//! `schedulers/scheduling_unipc_multistep.py`) with its defaults: `solver_order` 2, `bh2`,
//! `predict_x0`, `lower_order_final`, no disabled corrector steps, `final_sigmas_type` "zero"
//! and `linspace` spacing (SD1.5's config sets none of these).
//!
//! Owns UniPC's schedule (`steps + 1` spaced points, the last dropped; sigmas
//! `sqrt((1−ᾱ)/ᾱ)` at them, then 0), the predictor (UniP: an exponential-integrator step in
//! λ = log(α/σ) from the current x₀ prediction plus, at order 2, the difference to the previous
//! one) and the corrector (UniC: on the next step, refit the last move using the new x₀
//! prediction). Steps 0 and the last are first order; the others second.
//!
//! A step needs the x₀ predictions of the two previous steps and the sample the last step
//! started from, so UniPC is a [`MultistepSampler`]: the scheduler is shared and immutable, and
//! each image's history lives in a [`UniPcState`]. Karras/exponential/beta/flow sigmas, order 3,
//! `bh1`, thresholding and `solver_p` are not supported.

use super::ddim::{check_timesteps, linspace_rounded, trailing_timesteps};
use super::{
    MultistepSampler, PredictionType, ScheduleConfig, SchedulerError, StepOutput, TimestepSpacing,
    alphas_cumprod, check_step,
};
use crate::engine::rng::Randn;

const NAME: &str = "UniPC";
/// diffusers' default `solver_order`.
const SOLVER_ORDER: usize = 2;

/// diffusers' `UniPCMultistepScheduler` with its default options.
#[derive(Clone, Debug)]
pub struct UniPcScheduler {
    timesteps: Vec<f32>,
    /// One sigma per step plus a trailing 0.
    sigmas: Vec<f32>,
    prediction_type: PredictionType,
}

/// What one image's UniPC run carries from step to step (diffusers keeps it on the scheduler:
/// `model_outputs`, `last_sample`, `this_order`, the step counter).
#[derive(Clone, Debug, Default)]
pub struct UniPcState {
    /// The x₀ predictions of the last two steps, the newest last.
    model_outputs: Vec<Vec<f32>>,
    /// The (corrected) sample the last predictor started from.
    last_sample: Option<Vec<f32>>,
    /// The predictor order of the last step, which is the order of this step's corrector.
    last_order: usize,
    /// The index the next `step` call must have.
    next_index: usize,
}

impl UniPcScheduler {
    /// The schedule for `steps` inference steps, `1..=num_train_timesteps`.
    ///
    /// `timestep_spacing` defaults to `linspace`, diffusers' default for this scheduler.
    pub fn new(config: &ScheduleConfig, steps: usize) -> Result<Self, SchedulerError> {
        config.validate()?;
        let train = config.num_train_timesteps;
        if steps == 0 || steps > train {
            return Err(SchedulerError::StepCount {
                sampler: NAME,
                steps,
                min: 1,
                max: train,
            });
        }
        let discrete: Vec<usize> =
            match config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace) {
                // `np.linspace(0, N-1, steps+1).round()[::-1][:-1]`.
                TimestepSpacing::Linspace => linspace_rounded((train - 1) as f64, steps + 1)
                    .into_iter()
                    .skip(1)
                    .rev()
                    .collect(),
                // `(arange(steps+1) · (N // (steps+1))).round()[::-1][:-1] + steps_offset`.
                TimestepSpacing::Leading => (1..=steps)
                    .rev()
                    .map(|i| i * (train / (steps + 1)) + config.steps_offset)
                    .collect(),
                TimestepSpacing::Trailing => trailing_timesteps(train, steps),
            };
        check_timesteps(NAME, &discrete, train)?;
        let alphas = alphas_cumprod(config);
        // `np.interp` at integer timesteps picks the float32 training sigma itself.
        let mut sigmas: Vec<f32> = discrete
            .iter()
            .map(|&t| ((1.0 - alphas[t]) / alphas[t]).sqrt())
            .collect();
        sigmas.push(0.0);
        Ok(Self {
            // Timesteps are below num_train_timesteps, exact in f32.
            timesteps: discrete.iter().map(|&t| t as f32).collect(),
            sigmas,
            prediction_type: config.prediction_type,
        })
    }

    /// The noise levels: one per step, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The predictor order of step `index`: 1 on the first step (no history yet) and, with
    /// `lower_order_final`, on the last.
    fn order(&self, index: usize) -> usize {
        let remaining = self.timesteps.len() - index;
        SOLVER_ORDER.min(remaining).min(index.min(SOLVER_ORDER) + 1)
    }

    /// x₀ predicted from the model output at step `index` (`convert_model_output`).
    fn predict_x0(&self, index: usize, model_output: &[f32], sample: &[f32]) -> Vec<f32> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        let pairs = model_output.iter().zip(sample);
        match self.prediction_type {
            PredictionType::Epsilon => pairs.map(|(&e, &x)| (x - sigma * e) / alpha).collect(),
            PredictionType::Sample => model_output.to_vec(),
            PredictionType::VPrediction => pairs.map(|(&v, &x)| alpha * x - sigma * v).collect(),
        }
    }

    /// `λ = log(α) − log(σ)` at `sigmas[index]` (+∞ at the final σ = 0).
    fn lambda(&self, index: usize) -> f32 {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        alpha.ln() - sigma.ln()
    }

    /// The coefficients shared by the predictor (from step `from` to `to = from + 1`) and the
    /// corrector (the same move, refit one step later).
    fn bh2(&self, from: usize, to: usize) -> Move {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[to]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[from]);
        let lambda_s0 = self.lambda(from);
        let h = self.lambda(to) - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        Move {
            keep: sigma_t / sigma_s0,
            x0: alpha_t * h_phi_1,
            // `alpha_t · B_h` with `B_h = expm1(hh)` (bh2).
            correction: alpha_t * hh.exp_m1(),
            lambda_s0,
            h,
            hh,
            h_phi_1,
        }
    }

    /// `(mi − m0) / r` with `r = (λ_si − λ_s0)/h`, the scaled difference to an older x₀.
    fn difference(&self, mv: &Move, si: usize, mi: &[f32], m0: &[f32]) -> (f32, Vec<f32>) {
        let rk = (self.lambda(si) - mv.lambda_s0) / mv.h;
        let d1 = mi.iter().zip(m0).map(|(&a, &b)| (a - b) / rk).collect();
        (rk, d1)
    }

    /// UniP (`multistep_uni_p_bh_update`) from step `index` with x₀ history `outputs` (newest
    /// last, this step's included).
    fn predict(&self, index: usize, order: usize, x: &[f32], outputs: &[Vec<f32>]) -> Vec<f32> {
        let mv = self.bh2(index, index + 1);
        let m0 = &outputs[outputs.len() - 1];
        let base = x.iter().zip(m0).map(|(&x, &m)| mv.keep * x - mv.x0 * m);
        if order < 2 {
            // `x_t_ − alpha_t·B_h·0`.
            return base.collect();
        }
        let (_, d1) = self.difference(&mv, index - 1, &outputs[outputs.len() - 2], m0);
        // `rhos_p = [0.5]` for order 2.
        base.zip(&d1)
            .map(|(b, &d)| b - mv.correction * (0.5 * d))
            .collect()
    }

    /// UniC (`multistep_uni_c_bh_update`) at step `index`: refits the move from `index − 1`
    /// using this step's x₀ `model_t`. `last` is the sample the last step's predictor started
    /// from and `outputs` the x₀ history before this step (newest last); the result replaces
    /// this step's sample.
    fn correct(
        &self,
        index: usize,
        order: usize,
        last: &[f32],
        outputs: &[Vec<f32>],
        model_t: &[f32],
    ) -> Vec<f32> {
        let m0 = &outputs[outputs.len() - 1];
        let mv = self.bh2(index - 1, index);
        let (rhos, corr): ([f32; 2], Option<Vec<f32>>) = if order < 2 {
            ([0.0, 0.5], None)
        } else {
            let (rk, d1) = self.difference(&mv, index - 2, &outputs[outputs.len() - 2], m0);
            // `b_i = h_phi_k · i! / B_h`, with `h_phi_k` stepped as diffusers does.
            let b_h = mv.hh.exp_m1();
            let mut h_phi_k = mv.h_phi_1 / mv.hh - 1.0;
            let b1 = h_phi_k / b_h;
            h_phi_k = h_phi_k / mv.hh - 0.5;
            let b2 = (h_phi_k * 2.0) / b_h;
            let (r0, r1) = solve_2x2(rk, b1, b2);
            ([r0, r1], Some(d1))
        };
        let d1_t = model_t.iter().zip(m0).map(|(&a, &b)| a - b);
        let tail: Vec<f32> = match &corr {
            Some(d1) => d1_t
                .zip(d1)
                .map(|(d, &c)| rhos[0] * c + rhos[1] * d)
                .collect(),
            None => d1_t.map(|d| rhos[1] * d).collect(),
        };
        last.iter()
            .zip(m0)
            .zip(&tail)
            .map(|((&x, &m), &r)| (mv.keep * x - mv.x0 * m) - mv.correction * r)
            .collect()
    }
}

/// The scalars of one UniPC move from `s0` to `t`.
struct Move {
    /// `σ_t / σ_s0`.
    keep: f32,
    /// `α_t · h_phi_1`.
    x0: f32,
    /// `α_t · B_h`.
    correction: f32,
    lambda_s0: f32,
    h: f32,
    hh: f32,
    h_phi_1: f32,
}

/// `(α_t, σ_t)` of a VE sigma: `α = 1/sqrt(σ² + 1)`, `σ_t = σ·α`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `torch.linalg.solve([[1, 1], [rk, 1]], [b1, b2])` in float32 as torch's CPU LAPACK (MKL
/// `sgesv`) computes it: partial pivoting (rows swap when `|rk| > 1`), no fused multiply-adds,
/// and division by the pivots done as multiplication by their reciprocals. Checked bit-exact
/// against torch 2.15 on 3,000 random systems of this form.
fn solve_2x2(rk: f32, b1: f32, b2: f32) -> (f32, f32) {
    let (a11, c1, a21, c2) = if rk.abs() > 1.0 {
        (rk, b2, 1.0, b1)
    } else {
        (1.0, b1, rk, b2)
    };
    // Both row orders have 1 in the second column.
    let l = a21 * (1.0 / a11);
    let u22 = 1.0 - l;
    let y2 = c2 - l * c1;
    let x2 = y2 * (1.0 / u22);
    let x1 = (c1 - x2) * (1.0 / a11);
    (x1, x2)
}

impl MultistepSampler for UniPcScheduler {
    type State = UniPcState;

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// UniPC starts from unit-variance noise.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// UniPC feeds the latent to the UNet unchanged.
    fn scale_model_input(&self, sample: &[f32], index: usize) -> Result<Vec<f32>, SchedulerError> {
        if index >= self.timesteps.len() {
            return Err(SchedulerError::StepIndex {
                index,
                steps: self.timesteps.len(),
            });
        }
        Ok(sample.to_vec())
    }

    fn start(&self) -> UniPcState {
        UniPcState::default()
    }

    /// One UniPC step: x₀ from the model output, the corrector on `sample` (from the second
    /// step on), then the predictor to the next sigma. `denoised` is this step's x₀; UniPC
    /// draws no noise.
    fn step(
        &self,
        state: &mut UniPcState,
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        _rng: &mut dyn Randn,
    ) -> Result<StepOutput, SchedulerError> {
        check_step(index, self.timesteps.len(), model_output, sample)?;
        if index != state.next_index {
            return Err(SchedulerError::StepOrder {
                index,
                expected: state.next_index,
            });
        }
        if let Some(earlier) = state
            .model_outputs
            .first()
            .filter(|m| m.len() != sample.len())
        {
            return Err(SchedulerError::LengthMismatch {
                model_output: earlier.len(),
                sample: sample.len(),
            });
        }
        let x0 = self.predict_x0(index, model_output, sample);
        // The corrector runs from the second step on (diffusers' `disable_corrector` is empty).
        let corrected = match state.last_sample.as_deref() {
            Some(last) if index > 0 => {
                self.correct(index, state.last_order, last, &state.model_outputs, &x0)
            }
            _ => sample.to_vec(),
        };
        if state.model_outputs.len() == SOLVER_ORDER {
            state.model_outputs.remove(0);
        }
        state.model_outputs.push(x0.clone());
        let order = self.order(index);
        let prev_sample = self.predict(index, order, &corrected, &state.model_outputs);
        state.last_sample = Some(corrected);
        state.last_order = order;
        state.next_index = index + 1;
        Ok(StepOutput {
            prev_sample,
            denoised: x0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rng::TorchRng;

    fn sd15(spacing: Option<TimestepSpacing>, steps: usize) -> UniPcScheduler {
        let config = ScheduleConfig {
            timestep_spacing: spacing,
            ..ScheduleConfig::default()
        };
        UniPcScheduler::new(&config, steps).expect("valid schedule")
    }

    #[test]
    fn spacings_follow_diffusers() {
        assert_eq!(sd15(None, 4).timesteps(), [999.0, 749.0, 500.0, 250.0]);
        assert_eq!(sd15(None, 1).timesteps(), [999.0]);
        assert_eq!(
            sd15(Some(TimestepSpacing::Leading), 4).timesteps(),
            [801.0, 601.0, 401.0, 201.0]
        );
        assert_eq!(
            sd15(Some(TimestepSpacing::Trailing), 4).timesteps(),
            [999.0, 749.0, 499.0, 249.0]
        );
        let unipc = sd15(None, 6);
        assert_eq!(unipc.sigmas().len(), 7);
        assert_eq!(unipc.sigmas()[6], 0.0);
    }

    #[test]
    fn orders_warm_up_and_lower_at_the_end() {
        let orders: Vec<usize> = (0..4).map(|i| sd15(None, 4).order(i)).collect();
        assert_eq!(orders, [1, 2, 2, 1]);
        assert_eq!(sd15(None, 1).order(0), 1);
    }

    #[test]
    fn one_step_returns_the_x0_prediction() {
        // σ = 0 after the last step: λ = +∞, so the first-order move lands on x₀ exactly.
        let unipc = sd15(None, 1);
        let mut state = unipc.start();
        let mut rng = TorchRng::new(0);
        let out = unipc
            .step(&mut state, 0, &[0.5; 4], &[1.0, -2.0, 3.0, 0.25], &mut rng)
            .expect("step");
        assert_eq!(out.prev_sample, out.denoised);
    }

    #[test]
    fn steps_must_come_in_order_and_fit_the_schedule() {
        let unipc = sd15(None, 3);
        let mut state = unipc.start();
        let mut rng = TorchRng::new(0);
        let err = unipc.step(&mut state, 1, &[0.0], &[0.0], &mut rng);
        assert!(matches!(
            err,
            Err(SchedulerError::StepOrder {
                index: 1,
                expected: 0
            })
        ));
        unipc
            .step(&mut state, 0, &[0.0; 2], &[0.0; 2], &mut rng)
            .expect("step 0");
        let err = unipc.step(&mut state, 1, &[0.0; 3], &[0.0; 3], &mut rng);
        assert!(matches!(err, Err(SchedulerError::LengthMismatch { .. })));
        assert!(unipc.scale_model_input(&[0.0], 3).is_err());
        for steps in [0, 1001] {
            let err = UniPcScheduler::new(&ScheduleConfig::default(), steps).map(|_| ());
            assert!(matches!(err, Err(SchedulerError::StepCount { .. })));
        }
    }

    #[test]
    fn the_2x2_solve_pivots_like_lapack() {
        // Exact in both row orders.
        assert_eq!(solve_2x2(-1.0, 1.0, -1.0), (1.0, 0.0));
        assert_eq!(solve_2x2(-3.0, 0.0, 4.0), (-1.0, 1.0));
        assert_eq!(solve_2x2(0.5, 3.0, 2.0), (2.0, 1.0));
        // torch.linalg.solve's float32 results where plain division by the pivots would round
        // differently (found by search), without and with the row swap.
        let got = solve_2x2(-0.374_409_62, 0.028_422_242, 0.546_713);
        assert_eq!(got, (-0.377_100_62, 0.405_522_85));
        let got = solve_2x2(-1.681_918_4, 0.821_618_14, 0.330_437_06);
        assert_eq!(got, (0.183_145_43, 0.638_472_74));
    }
}
