"""pipeline/storage/urls.py: shard patterns."""

import pytest

from pipeline.errors import UserError
from pipeline.storage import urls


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("s/<000..002>.tar", ["s/000.tar", "s/001.tar", "s/002.tar"]),
        ("s/{000..002}.tar", ["s/000.tar", "s/001.tar", "s/002.tar"]),
        ("s/{8..10}.tar", ["s/8.tar", "s/9.tar", "s/10.tar"]),
        ("a.tar::b/<01..02>.tar", ["a.tar", "b/01.tar", "b/02.tar"]),
        ("s/{a,b}.tar", ["s/a.tar", "s/b.tar"]),
        ("http://h:8/x/<0..1>.tar", ["http://h:8/x/0.tar", "http://h:8/x/1.tar"]),
    ],
)
def test_expand_pattern(pattern, expected):
    assert urls.expand_pattern(pattern) == expected


@pytest.mark.parametrize(
    "pattern", ["s/<000..03x>.tar", "s/{000..}.tar", "s/<0..3.tar", "s/{0..3.tar", "s/0..3>.tar", "a.tar::"]
)
def test_malformed_patterns_are_user_errors(pattern):
    with pytest.raises(UserError, match="malformed|empty entry"):
        urls.expand_pattern(pattern)
