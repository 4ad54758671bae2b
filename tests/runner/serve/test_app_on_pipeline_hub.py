"""The app's own tests again, with the app over the pipeline's stage processes (PipelineHub) instead of the in-process
hub: the same clients get the same transcripts, errors and bounds through the real queues."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# Collected here, where `hub` is the pipeline's: each runs as in its own module, on this module's hub.
from tests.runner.serve.test_realtime import (  # noqa: F401
    test_a_client_that_reads_too_slowly_is_closed_and_stalls_no_one,
    test_a_message_past_the_server_s_read_limit_closes_only_its_connection,
    test_a_vllm_client_gets_the_chain_text_with_timed_deltas,
    test_a_vllm_session_has_its_own_delay_and_goes_on_after_done,
    test_a_vllm_session_s_back_to_back_streams_come_out_one_after_the_other,
    test_every_malformed_input_gets_its_error_and_the_sessions_go_on,
    test_idle_sessions_are_closed_and_their_streams_freed,
    test_past_the_hub_s_ceiling_sessions_and_uploads_are_refused,
    test_the_official_openai_realtime_client_gets_the_chain_text,
    test_the_page_health_models_and_metrics,
    test_twenty_abrupt_disconnects_leave_nothing_and_the_server_serves_on,
    test_twenty_concurrent_sessions_each_get_their_solo_transcript,
)
from tests.runner.serve.test_transcriptions import (  # noqa: F401
    client,
    reference,
    test_a_client_leaving_a_stream_early_frees_it_at_once,
    test_a_stream_s_own_delay,
    test_any_rate_and_channels_are_resampled_as_the_cli_does,
    test_bad_requests_get_openai_s_error_body,
    test_json_gives_the_chain_ids_and_text,
    test_stream_sends_the_deltas_then_the_whole_text,
    test_text_and_subtitles_are_the_cli_writers_output,
    test_verbose_json_has_timed_segments_with_their_ids,
    wav,
)
from voxtral_run.runner.serve.pipeline_hub import PipelineHub


@pytest.fixture(scope="module")
def hub(pipeline_hub: PipelineHub) -> Iterator[PipelineHub]:
    """The hub the imported tests' server serves: the pipeline's stages."""
    yield pipeline_hub
