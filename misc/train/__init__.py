"""Training: losses, the self-critical rewards, optimisers, the loss module, the distillation teacher, one step."""
