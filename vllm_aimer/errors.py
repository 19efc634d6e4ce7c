"""The one exception type users see from vllm-aimer."""

__all__ = ["AimerError"]


class AimerError(ValueError):
    """A problem with the user's input: the message names it and says how to fix it.

    Subclasses ValueError so vLLM reports it like its own config errors.

    Args:
        problem: what is wrong, as one or more sentences.
        fix: what to do about it; appended to the message as " Fix: ..." when given.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        message = f"vllm-aimer: {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)
