// Benchmark peer for tensorcost-events: the smallest Socket.IO 4.8 server
// that does the same job at the edge. Subscribers connect at path /ws with
// auth { tenant } and join that tenant's room; a publisher connects with
// auth { role: 'publisher' } and emits 'publish' { tenant, type, data },
// which is broadcast to the room on channel 'event' with the broker's
// envelope { id, type, data, timestamp, trace_id }.
//
// It does less than the broker (no token verification, no validation, no
// history, no rate limit), which favours the peer.
//
// Usage: PORT=0 node server.js   (prints "listening <port>" when ready)
import { createServer } from 'node:http';
import { randomUUID, randomBytes } from 'node:crypto';
import { Server } from 'socket.io';

const httpServer = createServer();
const io = new Server(httpServer, {
  path: '/ws',
  serveClient: false,
  transports: ['websocket', 'polling'],
  cors: { origin: true },
});

io.on('connection', (socket) => {
  const auth = socket.handshake.auth || {};
  if (auth.role === 'publisher') {
    socket.on('publish', (m) => {
      io.to(m.tenant).emit('event', {
        id: randomUUID(),
        type: m.type,
        data: m.data,
        timestamp: new Date().toISOString(),
        trace_id: randomBytes(16).toString('hex'),
      });
    });
    return;
  }
  if (typeof auth.tenant !== 'string' || auth.tenant === '') {
    socket.disconnect(true);
    return;
  }
  socket.join(auth.tenant);
  socket.emit('session', { tenant_id: auth.tenant });
});

httpServer.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  console.log(`listening ${httpServer.address().port}`);
});
