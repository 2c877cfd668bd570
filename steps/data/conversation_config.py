"""Settings of conversation data (data.format, data.conversation): which columns hold the
turns, the system prompt and the tools, how ShareGPT role tags map to roles, and which
assistant turns carry the loss. Modelled on LLaMA-Factory's dataset_info.json `columns` and
`tags` (its defaults are these defaults)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DataFormat = Literal["auto", "prompt_response", "text", "messages", "sharegpt"]
ConversationFormat = Literal["messages", "sharegpt"]
TrainOn = Literal["all_assistant", "last_assistant"]

# The turn column each conversation format reads when data.conversation.messages_column is
# null (OpenAI/TRL datasets call it `messages`, ShareGPT ones `conversations`).
DEFAULT_MESSAGES_COLUMNS: dict[ConversationFormat, str] = {
    "messages": "messages",
    "sharegpt": "conversations",
}


class SharegptTags(BaseModel):
    """The keys and role tags of a ShareGPT turn (LLaMA-Factory's `tags`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role_tag: str = Field(default="from", description="The key of a turn's role tag.")
    content_tag: str = Field(default="value", description="The key of a turn's text.")
    user_tag: str = Field(default="human", description="The role tag of a user turn.")
    assistant_tag: str = Field(default="gpt", description="The role tag of an assistant turn.")
    system_tag: str = Field(default="system", description="The role tag of a system turn.")
    function_tag: str = Field(
        default="function_call",
        description="The role tag of an assistant's tool call: its text is the JSON "
        '{"name": ..., "arguments": ...} (or a list of them).',
    )
    observation_tag: str = Field(
        default="observation", description="The role tag of a tool's result (a tool turn)."
    )

    def roles(self) -> dict[str, str]:
        """Role tag → canonical role; a function tag becomes an assistant turn's tool call."""
        return {
            self.user_tag: "user",
            self.assistant_tag: "assistant",
            self.system_tag: "system",
            self.function_tag: "assistant",
            self.observation_tag: "tool",
        }


class ConversationConfig(BaseModel):
    """Where a conversation source keeps its turns, system prompt and tools."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages_column: str | None = Field(
        default=None,
        description="The column of turns; null: `messages` (data.format messages) or "
        "`conversations` (sharegpt). A name of your own needs an explicit data.format.",
    )
    system_column: str | None = Field(
        default=None,
        description="A column whose text becomes the first, system turn; null: `system` where "
        "the source has it. A name given here must exist.",
    )
    tools_column: str | None = Field(
        default=None,
        description="A column of the JSON list of tools a conversation may call; null: `tools` "
        "where the source has it. A name given here must exist.",
    )
    tags: SharegptTags = Field(
        default_factory=SharegptTags,
        description="data.format sharegpt: the keys and role tags of a turn.",
    )
    # all_assistant teaches every reply in context; last_assistant only the final one (earlier
    # replies are context, e.g. when they come from another model).
    train_on: TrainOn = Field(
        default="all_assistant",
        description="Which assistant turns carry the loss: all_assistant or last_assistant "
        "(truncation then keeps the last assistant turn or gives the row a reason).",
    )
