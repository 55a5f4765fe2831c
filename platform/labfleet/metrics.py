"""Metric names shared by every algorithm (ARCHITECTURE section 6). Defined once, used everywhere."""

EVAL_RETURN_MEAN = "eval/return_mean"
EVAL_RETURN_STD = "eval/return_std"
# eval.select_best, on the final record of a seed run: the env step of the selected network, and the evaluation
# of the network training ended with (before the selection)
SELECTED_STEP = "select/step"
LAST_RETURN_MEAN = "select/last_return_mean"
TRAIN_EPISODE_RETURN = "train/episode_return"
TRAIN_EPISODE_LENGTH = "train/episode_length"
ENV_STEPS = "time/env_steps"
SPS = "time/sps"
LOSS_POLICY = "loss/policy"
LOSS_VALUE = "loss/value"
LOSS_ENTROPY = "loss/entropy"
LEARNING_RATE = "train/learning_rate"
GRAD_NORM = "train/grad_norm"
TD_ERROR = "train/td_error"
EPSILON = "train/epsilon"
BELLMAN_RESIDUAL = "vi/bellman_residual"
POLICY_CHANGES = "pi/policy_changes"  # states whose action policy iteration changed
MC_EPISODES = "mc/episodes"  # episodes Monte Carlo control has learned from

PPO_APPROX_KL = "ppo/approx_kl"
PPO_CLIP_FRACTION = "ppo/clip_fraction"
PPO_EXPLAINED_VARIANCE = "ppo/explained_variance"
PPO_KL = "ppo/kl"  # exact mean KL[pi_old, pi] after the update (the KL-penalty form)
PPO_KL_COEF = "ppo/kl_coef"  # the KL penalty's beta during the update
TRPO_KL = "trpo/kl"  # mean KL[pi_old, pi] of the accepted step
TRPO_STEP_COEF = "trpo/step_coef"  # the line search's accepted fraction of the full step (0: rejected)
TRPO_LINE_SEARCH_TRIES = "trpo/line_search_tries"
TRPO_IMPROVEMENT = "trpo/surrogate_improvement"
ES_RETURN_MAX = "es/return_max"  # the best perturbed episode of the iteration
ES_GRAD_NORM = "es/grad_norm"  # norm of the estimated gradient
ES_THETA_NORM = "es/theta_norm"
ES_PAIR_AGREEMENT = "es/tied_pairs"  # share of antithetic pairs whose two returns were equal (no signal)
DQN_EPSILON = "dqn/epsilon"
DDPG_Q_MEAN = "ddpg/q_mean"
Q_MEAN = "train/q_mean"

VAE_NEG_ELBO = "eval/neg_elbo"
VAE_RECON_NLL = "eval/recon_nll"
VAE_KL = "eval/kl"
GAN_MODES_COVERED = "eval/modes_covered"
GAN_HIGH_QUALITY_FRAC = "eval/high_quality_frac"
LOSS_GENERATOR = "loss/generator"
LOSS_DISCRIMINATOR = "loss/discriminator"
# generative models, beyond ARCHITECTURE section 6 (names in the same scheme)
VAE_BASELINE_NLL = "eval/baseline_nll"
VAE_IWAE_NLL = "eval/iwae_nll"
LOSS_VAE = "loss/vae"
LOSS_CRITIC = "loss/critic"  # the GAN's rejection critic (`drs: true`)
TRAIN_NEG_ELBO = "train/neg_elbo"
TRAIN_KL = "train/kl"
GAN_MODE_KL = "eval/mode_kl"
FD_DIGITS = "eval/fd_digits"
CONFIDENT_FRAC = "eval/confident_frac"
VALID_NEG_ELBO = "valid/neg_elbo"
VALID_FD_DIGITS = "valid/fd_digits"
VALID_MODE_SCORE = "valid/mode_score"
# 8-bit image datasets: bits per dimension, and sample quality in a feature classifier's features
VAE_BITS_PER_DIM = "eval/bits_per_dim"
FD = "eval/fd"
KID = "eval/kid"
PRECISION = "eval/precision"
RECALL = "eval/recall"
VALID_FD = "valid/fd"
EARLY_STOP_BEST_STEP = "early_stopping/best_step"
EARLY_STOP_STOPPED = "early_stopping/stopped"

EVAL_PREFIX = "eval/"
STD_SUFFIX = "_std"
