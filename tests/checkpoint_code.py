"""The custom code of Qwen2.5-Math-PRM's checkpoint, in the shape its files have (``configuration_qwen2_rm.py``,
``modeling_qwen2_rm.py``): a Qwen2 model, then Linear → ReLU → Linear to two logits at every position — what vLLM
implements natively as ``Qwen2ForProcessRewardModel``. Tests write it into tiny checkpoint directories and load
it with ``trust_remote_code`` as the real code would be."""

QWEN_RM_CONFIG_CODE = """
from transformers import Qwen2Config


class Qwen2RMConfig(Qwen2Config):
    model_type = "qwen2"
"""

QWEN_PRM_MODEL_CODE = """
import torch
from transformers import PreTrainedModel, Qwen2Model
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from .configuration_qwen2_rm import Qwen2RMConfig


class Qwen2ForProcessRewardModel(PreTrainedModel):
    config_class = Qwen2RMConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.score = torch.nn.Sequential(
            torch.nn.Linear(config.hidden_size, config.hidden_size), torch.nn.ReLU(),
            torch.nn.Linear(config.hidden_size, 2),
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SequenceClassifierOutputWithPast(logits=self.score(hidden))
"""
