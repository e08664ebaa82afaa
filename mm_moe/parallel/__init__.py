"""Everything distributed: process groups, the DeepSpeed engine, gathering sharded state.

This is the only package that imports deepspeed or megatron-core.
"""
