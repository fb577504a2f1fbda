"""Request bodies of the API (pydantic). Images stay untyped here: images.py checks them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvaluateRequest(Strict):
    tasks: StrictInt | None = Field(None, ge=1, le=100_000, description="test tasks (default 600)")
    glob_update_step_test: StrictInt | None = Field(
        None, ge=0, le=100, description="inner steps at test time (default: the run's)"
    )


class ResumeRequest(Strict):
    epochs: StrictInt | None = Field(None, ge=1, description="new total of meta-iterations")


IMAGE_HELP = (
    "Omniglot runs: a PNG data URL of a drawing or a 28x28 nested list in [0, 1] (ink = 1); "
    "image-folder runs: a PNG or JPEG data URL of an image file (preprocessed like the set)"
)


class SupportImage(Strict):
    image: Any = Field(description=IMAGE_HELP)
    label: StrictInt = Field(ge=0, le=1000)


class AdaptRequest(Strict):
    run: str
    support: list[SupportImage]
    query: list[Any] = Field(description=f"query images; {IMAGE_HELP}")
    steps: StrictInt = Field(5, ge=0, le=10)


class NavigateRequest(Strict):
    run: str
    goal: list[StrictFloat | StrictInt] = Field(
        min_length=2, max_length=2, description="the goal (x, y), each in [-1, 1]"
    )
    steps: StrictInt = Field(3, ge=0, le=5, description="policy-gradient steps")
    trajectories: StrictInt = Field(20, ge=1, le=40, description="trajectories per step")
    seed: StrictInt = Field(0, ge=0, le=2**32 - 1, description="seed of the exploration noise")
