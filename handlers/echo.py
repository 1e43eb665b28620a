"""Echo service: cmd_id 1 answers with the request's seq_num, cmd_id, user_id and body."""

from aserver import App, Request

app = App("echo")

ECHO = 1


@app.handler(ECHO)
async def echo(request: Request) -> bytes:
    return request.body
