"""Small random Hugging Face models shared by the test files (GPT-2's and T5's weights perturbed away
from their initialization, so that a mistake in any of them shows), and T5's inputs."""

import torch
import transformers as T


def bert():
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37)).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           eos_token_id=98, bos_token_id=98)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def t5(seed, **overrides):
    torch.manual_seed(seed)
    config = T.T5Config(vocab_size=99, d_model=32, d_kv=16, num_heads=2, d_ff=37, num_layers=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=20,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **overrides)
    model = T.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def t5_inputs():
    """``(input_ids, attention_mask, decoder_input_ids)``: batch 2, the second row right-padded."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 99, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    return ids.masked_fill(mask == 0, 0), mask, torch.randint(2, 99, (2, 4), generator=g)
