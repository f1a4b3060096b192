# One image for every process: `gateway web`, `gateway worker`, `gateway migrate`.
#   docker build -t webhook-job-gateway .
#   docker run --env-file .env webhook-job-gateway gateway migrate
#   docker run --env-file .env -p 8000:8000 webhook-job-gateway             # web
#   docker run --env-file .env webhook-job-gateway gateway worker
# Your own tasks: FROM this image, COPY my_tasks.py into /app, set TASK_MODULES=my_tasks.

FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
COPY jobs /src/jobs
COPY webhooks /src/webhooks
COPY db /src/db
RUN /opt/venv/bin/pip install '/src[server]'

FROM python:3.12-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin gateway \
    && mkdir /data && chown gateway /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/data \
    LOG_FORMAT=json
WORKDIR /app
USER gateway
EXPOSE 8000
CMD ["gateway", "web"]
