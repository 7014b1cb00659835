#!/bin/sh
# Keep this worker's own clone in $NMT_WORKDIR (flows run there: see the pull steps of prefect.yaml), point its DVC
# remote `minio` at the object store, then run the command (a Prefect worker, or the MLflow server).
set -eu
mkdir -p "$HOME"
# The Prefect API's auth string comes from a secret file, never from the compose file or an image layer.
if [ -n "${PREFECT_API_AUTH_STRING_FILE:-}" ] && [ -s "$PREFECT_API_AUTH_STRING_FILE" ]; then
    PREFECT_API_AUTH_STRING="$(cat "$PREFECT_API_AUTH_STRING_FILE")"
    export PREFECT_API_AUTH_STRING
fi
if [ -n "${NMT_GIT_URL:-}" ]; then
    if [ -s /run/secrets/git-credentials ]; then
        git config --global credential.helper "store --file=/run/secrets/git-credentials"
    fi
    if [ ! -d "$NMT_WORKDIR/.git" ]; then
        git clone --quiet "$NMT_GIT_URL" "$NMT_WORKDIR"
    fi
    cd "$NMT_WORKDIR"
    git config user.email "${GIT_AUTHOR_EMAIL:-worker@nmt}"
    git config user.name "${GIT_AUTHOR_NAME:-nmt worker}"
    if [ -n "${NMT_DVC_REMOTE_URL:-}" ]; then
        # .dvc/config.local is git-ignored: the endpoint is this deployment's, credentials come from AWS_* env
        dvc remote add --local --force minio "$NMT_DVC_REMOTE_URL"
        dvc remote modify --local minio endpointurl "$NMT_DVC_REMOTE_ENDPOINT"
    fi
    export PYTHONPATH="$NMT_WORKDIR"
fi
exec "$@"
