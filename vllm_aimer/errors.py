"""The one exception type users see from vllm-aimer."""


class AimerError(ValueError):
    """A problem with the user's input: the message names it and says how to fix it.

    Subclasses ValueError so vLLM reports it like its own config errors.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        message = f"vllm-aimer: {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)
