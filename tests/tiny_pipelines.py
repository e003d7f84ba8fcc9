"""Tiny random StableDiffusion3Pipeline, FluxPipeline and WanPipeline, every component built here from a small
config (no hub access: the tokenizers too, word-level over a fixed vocabulary). Each builds in well under a
second on a CPU, so the pipeline tests can afford several per run."""

from __future__ import annotations

import torch

WORDS = "a photo of cat dog red blue small big on the in at bad blurry low quality".split()


def word_tokenizer(model_max_length: int):
    """A fast tokenizer over ``WORDS`` (whitespace split, unknown words to <unk>), padding and truncating like
    CLIP's and T5's: what the pipelines' ``encode_prompt`` calls."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


VOCAB = len(WORDS) + 3


def clip_text(hidden=16, projection=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=projection or hidden,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_text(d_model=32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=VOCAB, d_model=d_model, d_ff=40, d_kv=8, num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=1
    )
    return T5EncoderModel(config).eval()


def vae_kl(latent_channels=4, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        **config,
    ).eval()


def sd3_transformer():
    """A 1-layer MMDiT on 8x8 latents with 4 channels (16 tokens of patch 2); text dim 32, pooled 32."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    ).eval()


def flux_transformer(guidance_embeds: bool = False):
    """A 1+1-layer Flux transformer on packed latents (B, 16, 16) (8x8 latents of 4 channels); text dim 32,
    pooled 16."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    ).eval()


def wan_transformer():
    """A 1-layer Wan transformer on (B, 16, F, H, W) latents, patch (1, 2, 2); text dim 32."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    ).eval()


def conditioning(family: str, batch: int, seed: int, device="cpu") -> dict:
    """Random model kwargs for the transformers above (5 text tokens): what each pipeline's encode_prompt and
    prepare_latents would give them. Flux's ids have no batch dimension (zeros for the text, the 4x4 grid)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 5, 32, generator=g)
    if family == "sd3":
        kw = dict(encoder_hidden_states=text, pooled_projections=torch.randn(batch, 32, generator=g))
    elif family == "flux":
        ids = torch.zeros(4, 4, 3)
        ids[..., 1] += torch.arange(4)[:, None]
        ids[..., 2] += torch.arange(4)[None, :]
        kw = dict(
            encoder_hidden_states=text,
            pooled_projections=torch.randn(batch, 16, generator=g),
            txt_ids=torch.zeros(5, 3),
            img_ids=ids.reshape(16, 3),
        )
    else:
        kw = dict(encoder_hidden_states=text)
    return {k: v.to(device) for k, v in kw.items()}


LATENT_SHAPES = {"sd3": (4, 8, 8), "flux": (16, 16), "wan": (16, 2, 4, 4)}  # per sample


def sd3_pipeline(scheduler, device="cpu"):
    """SD3 with two CLIP encoders and a T5 (joint dim 32), a 1-layer MMDiT on 8x8 latents (16 tokens)."""
    import diffusers

    transformer = sd3_transformer()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae_kl(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=clip_text(16, projection=16),
        tokenizer=word_tokenizer(16),
        text_encoder_2=clip_text(16, projection=16),
        tokenizer_2=word_tokenizer(16),
        text_encoder_3=t5_text(32),
        tokenizer_3=word_tokenizer(16),
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(scheduler, guidance_embeds: bool, device="cpu"):
    """Flux with CLIP (pooled 16) and T5 (dim 32), a 1+1-layer transformer; 16x16 images pack to (B, 16, 16)."""
    import diffusers

    transformer = flux_transformer(guidance_embeds)
    pipe = diffusers.FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae_kl(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=clip_text(16),
        tokenizer=word_tokenizer(16),
        text_encoder_2=t5_text(32),
        tokenizer_2=word_tokenizer(16),
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_pipeline(scheduler, device="cpu"):
    """Wan 2.1-style: a T5 encoder (dim 32), a 1-layer transformer on (B, 16, 2, 4, 4) latents (5 frames of
    32x32), Wan's causal 3-D VAE at base width 3."""
    import diffusers

    transformer = wan_transformer()
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    pipe = diffusers.WanPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=t5_text(32), tokenizer=word_tokenizer(16)
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# the published scheduler configs these pipelines ship with (the knobs that matter; the rest at defaults)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
WAN_UNIPC_SCHEDULER = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    sample_max_value=1.0,
    predict_x0=True,
    solver_type="bh2",
    lower_order_final=True,
    disable_corrector=[],
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)
WAN_EULER_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


# name: (builder, scheduler class, scheduler config, call arguments); each call runs 3 steps on 16x16 images
# (Wan: 5 frames of 32x32), batch 2 through num_images_per_prompt / num_videos_per_prompt
SWAPS = {
    "sd3": (
        sd3_pipeline,
        "FlowMatchEulerDiscreteScheduler",
        SD3_SCHEDULER,
        dict(negative_prompt="blurry", guidance_scale=5.0, num_images_per_prompt=2),
    ),
    "sd3-dynamic-shift": (
        sd3_pipeline,
        "FlowMatchEulerDiscreteScheduler",
        dict(SD3_SCHEDULER, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.16),
        dict(guidance_scale=4.0),
    ),
    "flux-dev": (
        lambda s, device="cpu": flux_pipeline(s, True, device),
        "FlowMatchEulerDiscreteScheduler",
        FLUX_DEV_SCHEDULER,
        dict(guidance_scale=3.5, num_images_per_prompt=2),
    ),
    "flux-dev-true-cfg": (
        lambda s, device="cpu": flux_pipeline(s, True, device),
        "FlowMatchEulerDiscreteScheduler",
        FLUX_DEV_SCHEDULER,
        dict(guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=2.0),
    ),
    "flux-schnell": (
        lambda s, device="cpu": flux_pipeline(s, False, device),
        "FlowMatchEulerDiscreteScheduler",
        FLUX_SCHNELL_SCHEDULER,
        dict(guidance_scale=0.0, num_images_per_prompt=2),
    ),
    "flux-schnell-true-cfg": (
        lambda s, device="cpu": flux_pipeline(s, False, device),
        "FlowMatchEulerDiscreteScheduler",
        FLUX_SCHNELL_SCHEDULER,
        dict(guidance_scale=0.0, negative_prompt="blurry", true_cfg_scale=3.0),
    ),
    "wan-unipc": (
        wan_pipeline,
        "UniPCMultistepScheduler",
        WAN_UNIPC_SCHEDULER,
        dict(negative_prompt="blurry", guidance_scale=5.0, num_videos_per_prompt=2),
    ),
    "wan-flow-euler": (
        wan_pipeline,
        "FlowMatchEulerDiscreteScheduler",
        WAN_EULER_SCHEDULER,
        dict(negative_prompt="blurry", guidance_scale=5.0),
    ),
    "wan-dpm-flow": (
        wan_pipeline,
        "DPMSolverMultistepScheduler",
        dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        dict(negative_prompt="blurry", guidance_scale=5.0),
    ),
    # schedulers fastdiff already has, for the plumbing: any scheduler a pipeline accepts gives the same images
    "sd3-dpm++": (sd3_pipeline, "DPMSolverMultistepScheduler", {}, dict(negative_prompt="blurry", guidance_scale=5.0)),
    "wan-dpm++": (wan_pipeline, "DPMSolverMultistepScheduler", {}, dict(negative_prompt="blurry", guidance_scale=5.0)),
}


def call_arguments(name: str, seed: int = 0, device="cpu") -> dict:
    """The pipeline call for swap ``name``: a prompt, 3 steps, tiny sizes, a generator, numpy output."""
    builder, _, _, extra = SWAPS[name]
    size = dict(height=32, width=32, num_frames=5) if name.startswith("wan") else dict(height=16, width=16)
    return dict(
        prompt="a photo of a cat",
        num_inference_steps=3,
        max_sequence_length=8,
        output_type="np",
        generator=torch.Generator(device).manual_seed(seed),
        **size,
        **extra,
    )
