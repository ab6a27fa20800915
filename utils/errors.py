"""The one error type for user mistakes, torch-free so the dataset tools can raise it too."""


class UserError(Exception):
    """A problem the user can fix (bad file, flag, dataset). CLIs print its message without a traceback.

    `all_ranks`: under torchrun, whether every rank raised this same error (then only rank 0 prints it);
    None: yes before the process group exists (every rank runs the same validation), no after."""

    def __init__(self, message: str, all_ranks: bool | None = None):
        super().__init__(message)
        self.all_ranks = all_ranks


def own_message(e: Exception) -> str:
    """The exception's message without the traceback text that a DataLoader worker's error carries
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ...: <message>")."""
    msg, head = str(e), f"\n{type(e).__module__}.{type(e).__qualname__}: "
    return msg[msg.rindex(head) + len(head):].rstrip() if "\nOriginal Traceback" in msg and head in msg else msg
