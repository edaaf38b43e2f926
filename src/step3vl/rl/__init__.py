"""Reinforcement learning: verifiable rewards, behaviour regularisers and (later) the RL loop."""
