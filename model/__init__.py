from model.adapter import AdaptedCLIP, SimpleAdapter, SimpleProj
from model.clip import build_clip, get_tokenizer, load_state_dict_file

__all__ = ["AdaptedCLIP", "SimpleAdapter", "SimpleProj", "build_clip", "get_tokenizer", "load_state_dict_file"]
