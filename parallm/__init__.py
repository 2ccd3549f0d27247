"""parallm: serve and train large language models fast."""

from parallm.llm import LLM
from parallm.outputs import CompletionOutput, Logprob, RequestOutput
from parallm.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
