"""Tiny, offline builds of every supported VLM family: random weights from the family's config class,
a byte-level tokenizer holding the special tokens its processor needs, its real image processor
class, and its chat template as shipped on the Hub (nothing is downloaded).

`real_size_config` gives the published architecture of one checkpoint per family, for counting
parameters on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import transformers as tf

from vlmtune.models import byte_level_tokenizer

HIDDEN, HEADS = 32, 2

LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-v1.6-mistral-7b-hf's template, typo included: it closes answers with the text "<\s>", not EOS.
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\s> '}}{% endif %}{% endfor %}"
)
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_TEMPLATE = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>").replace(".capitalize()", " | capitalize")
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GLM4V_TEMPLATE = (
    "[gMASK]<sop>{%- for msg in messages %}{%- if msg.role == 'user' %}<|user|>\n"
    "{%- if msg.content is string %}{{ msg.content }}{%- else %}{%- for item in msg.content %}"
    "{%- if item.type == 'image' or 'image' in item %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'assistant' %}<|assistant|>\n{{ msg.content }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyFamily:
    name: str
    build: Callable[[], tuple[torch.nn.Module, object]]
    real_size: Callable[[], object]
    image_size: tuple[int, int] = (32, 32)
    end_token: str = ""  # expected end of a trained answer


def image_only(processor_class):
    """`processor_class` accepting no video processor: video processors need torchvision, which this
    CPU install lacks, and every sample here is one image. Same class name, so families match it."""

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def _llama(tokenizer, **extra):
    return dict(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra,
    )


def _clip_vision(**extra):
    return tf.CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS, image_size=32, patch_size=8, **extra)


def _siglip_vision(image_size=32, **extra):
    return dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS, image_size=image_size, patch_size=8, **extra)


def _with_bos_post_processor(tokenizer):
    """Make the tokenizer prepend BOS by itself, as Llama's does."""
    from tokenizers import processors

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return tokenizer


def build_llava():
    tokenizer = _with_bos_post_processor(byte_level_tokenizer(["<unk>", "<s>", "</s>", "<image>", "<pad>"], pad="<pad>", bos="<s>", eos="</s>", image_token="<image>"))
    image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_15_TEMPLATE)
    config = tf.LlavaConfig(vision_config=_clip_vision(), text_config=tf.LlamaConfig(**_llama(tokenizer)), image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1, image_seq_length=16)
    return tf.LlavaForConditionalGeneration(config), processor


def build_llava_next():
    tokenizer = byte_level_tokenizer(["<unk>", "<s>", "</s>", "<image>", "<pad>"], pad="<pad>", bos="<s>", eos="</s>", image_token="<image>")
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = tf.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = tf.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_NEXT_TEMPLATE)
    text = tf.MistralConfig(**_llama(tokenizer))
    config = tf.LlavaNextConfig(vision_config=_clip_vision(), text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints, vision_feature_layer=-1)
    return tf.LlavaNextForConditionalGeneration(config), processor


def build_llava_onevision():
    tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], pad="<|endoftext|>", bos=None, eos="<|im_end|>", image_token="<image>", video_token="<video>")
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = tf.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = image_only(tf.LlavaOnevisionProcessor)(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, num_image_tokens=16, vision_feature_select_strategy="full", chat_template=LLAVA_ONEVISION_TEMPLATE)
    text = tf.Qwen2Config(**_llama(tokenizer))
    config = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(**_siglip_vision()), text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    return tf.LlavaOnevisionForConditionalGeneration(config), processor


def _idefics_tokenizer(bos: str, eos: str):
    grid = [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]
    specials = ["<|endoftext|>", bos, "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>", *grid]
    specials = list(dict.fromkeys(specials + [eos]))
    return byte_level_tokenizer(specials, pad="<|endoftext|>", bos=bos, eos=eos, image_token="<image>", fake_image_token="<fake_token_around_image>", global_image_token="<global-img>", end_of_utterance_token="<end_of_utterance>")


def build_idefics3():
    tokenizer = _with_bos_post_processor(_idefics_tokenizer("<|begin_of_text|>", "<|end_of_text|>"))
    image_processor = tf.Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    config = tf.Idefics3Config(
        vision_config=tf.Idefics3VisionConfig(**_siglip_vision()), text_config=tf.LlamaConfig(**_llama(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2,
    )
    return tf.Idefics3ForConditionalGeneration(config), processor


def _allow_smolvlm_without_num2words():
    """SmolVLM's processor refuses to start without `num2words`, which it uses only to spell out a
    video's frame count; the image-only tests stand in for it when it is not installed."""
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is None:
        processing_smolvlm.num2words = str


def build_smolvlm():
    tokenizer = _idefics_tokenizer("<|im_start|>", "<end_of_utterance>")
    image_processor = tf.SmolVLMImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    _allow_smolvlm_without_num2words()
    processor = image_only(tf.SmolVLMProcessor)(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
    # Its apply_chat_template reads the video sampling defaults even for image-only conversations.
    processor.video_processor = SimpleNamespace(num_frames=64, fps=1)
    config = tf.SmolVLMConfig(
        vision_config=tf.SmolVLMVisionConfig(**_siglip_vision()), text_config=tf.LlamaConfig(**_llama(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2,
    )
    return tf.SmolVLMForConditionalGeneration(config), processor


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_parts():
    tokenizer = byte_level_tokenizer(QWEN_SPECIALS, pad="<|endoftext|>", bos=None, eos="<|endoftext|>", image_token="<|image_pad|>", video_token="<|video_pad|>")
    image_processor = tf.Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=64 * 64)
    video_processor = None  # video processors need torchvision, which the CPU install lacks; images only here
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = _llama(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    return tokenizer, image_processor, video_processor, ids, text


def build_qwen2_vl():
    tokenizer, image_processor, video_processor, ids, text = _qwen_parts()
    processor = image_only(tf.Qwen2VLProcessor)(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=QWEN2_VL_TEMPLATE)
    vision = dict(depth=1, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=HEADS, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    return tf.Qwen2VLForConditionalGeneration(config), processor


def build_qwen2_5_vl():
    tokenizer, image_processor, video_processor, ids, text = _qwen_parts()
    processor = image_only(tf.Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=QWEN2_VL_TEMPLATE)
    vision = dict(depth=2, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_heads=HEADS, out_hidden_size=HIDDEN, patch_size=8, spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1])
    config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return tf.Qwen2_5_VLForConditionalGeneration(config), processor


def build_paligemma():
    tokenizer = byte_level_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], pad="<pad>", bos="<bos>", eos="<eos>", image_token="<image>")
    image_processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = tf.GemmaConfig(**_llama(tokenizer, head_dim=HIDDEN // HEADS))
    config = tf.PaliGemmaConfig(vision_config=tf.SiglipVisionConfig(**_siglip_vision(projection_dim=HIDDEN)), text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=HIDDEN)
    return tf.PaliGemmaForConditionalGeneration(config), processor


GLM_SPECIALS = [
    "<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>",
]


def build_glm4v():
    tokenizer = byte_level_tokenizer(GLM_SPECIALS, pad="<|endoftext|>", bos=None, eos="<|endoftext|>", image_token="<|image|>", video_token="<|video|>")
    image_processor = tf.Glm4vImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64})
    video_processor = None  # needs torchvision; images only here
    processor = image_only(tf.Glm4vProcessor)(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=GLM4V_TEMPLATE)
    token_ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"), ("image_start_token_id", "<|begin_of_image|>"),
        ("image_end_token_id", "<|end_of_image|>"), ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>"))}
    text = _llama(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5})
    vision = dict(depth=1, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_heads=HEADS, image_size=32, patch_size=8, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=HIDDEN)
    config = tf.Glm4vConfig(text_config=text, vision_config=vision, **token_ids)
    return tf.Glm4vForConditionalGeneration(config), processor


# --- the published architectures, for parameter counts on the meta device -------------------------

QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=384)


def real_llava():  # llava-hf/llava-1.5-7b-hf
    return tf.LlavaConfig(text_config=tf.LlamaConfig(vocab_size=32064))


def real_llava_next():  # llava-hf/llava-v1.6-mistral-7b-hf
    return tf.LlavaNextConfig(text_config=tf.MistralConfig(vocab_size=32064))


def real_llava_onevision():  # llava-hf/llava-onevision-qwen2-7b-ov-hf
    return tf.LlavaOnevisionConfig(text_config=tf.Qwen2Config(**QWEN2_7B), vision_config=tf.SiglipVisionConfig(**SIGLIP_SO400M))


def real_idefics3():  # HuggingFaceM4/Idefics3-8B-Llama3
    text = tf.LlamaConfig(vocab_size=128259, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    vision = tf.Idefics3VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=364)
    return tf.Idefics3Config(text_config=text, vision_config=vision, scale_factor=2)


def real_smolvlm():  # HuggingFaceTB/SmolVLM-Instruct (2.2B)
    text = tf.LlamaConfig(vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32)
    vision = tf.SmolVLMVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=384)
    return tf.SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=3)


def real_qwen2_vl():  # Qwen/Qwen2-VL-7B-Instruct
    return tf.Qwen2VLConfig(text_config=QWEN2_7B, vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16))


def real_qwen2_5_vl():  # Qwen/Qwen2.5-VL-7B-Instruct
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
    return tf.Qwen2_5_VLConfig(text_config=QWEN2_7B, vision_config=vision)


def real_paligemma():  # google/paligemma-3b-pt-224
    return tf.PaliGemmaConfig()


def real_glm4v():  # THUDM/GLM-4.1V-9B-Thinking
    return tf.Glm4vConfig()


FAMILIES = {
    "llava": TinyFamily("llava", build_llava, real_llava, end_token="</s>"),
    "llava_next": TinyFamily("llava_next", build_llava_next, real_llava_next, image_size=(64, 32), end_token="</s>"),
    "llava_onevision": TinyFamily("llava_onevision", build_llava_onevision, real_llava_onevision, image_size=(64, 32), end_token="<|im_end|>"),
    "idefics3": TinyFamily("idefics3", build_idefics3, real_idefics3, image_size=(64, 64), end_token="<end_of_utterance>"),
    "smolvlm": TinyFamily("smolvlm", build_smolvlm, real_smolvlm, image_size=(64, 64), end_token="<end_of_utterance>"),
    "qwen2_vl": TinyFamily("qwen2_vl", build_qwen2_vl, real_qwen2_vl, end_token="<|im_end|>"),
    "qwen2_5_vl": TinyFamily("qwen2_5_vl", build_qwen2_5_vl, real_qwen2_5_vl, end_token="<|im_end|>"),
    "paligemma": TinyFamily("paligemma", build_paligemma, real_paligemma, end_token="<eos>"),
    "glm4v": TinyFamily("glm4v", build_glm4v, real_glm4v, end_token="<|endoftext|>"),
}
