// A small TQServer worker on the JDK alone (com.sun.net.httpserver), no libraries.
//
// Routes, with the /kotlin prefix already stripped by the proxy:
//   /         a plain-text greeting
//   /info     JSON: worker name, instance, pid, JVM version, uptime, requests served
//   /bench    a fixed "Hello, World!" (cheap, for load tests)
//   /health   200 "ok" (WORKER_HEALTH_PATH, the supervisor's probe)
//
// On SIGTERM the JVM runs the shutdown hook: it waits for in-flight requests (at most
// WORKER_DRAIN_SECONDS, default 10), then closes the server. JDK 17's HttpServer.stop(n)
// always waits the full n seconds, so the hook counts in-flight exchanges itself.
import com.sun.net.httpserver.HttpExchange
import com.sun.net.httpserver.HttpHandler
import com.sun.net.httpserver.HttpServer
import java.lang.management.ManagementFactory
import java.net.InetSocketAddress
import java.util.concurrent.Executors
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicInteger
import java.util.concurrent.atomic.AtomicLong

const val GREETING = "Hello from Kotlin!"

val inFlight = AtomicInteger()
val served = AtomicLong()
val started = System.currentTimeMillis()

fun env(name: String, fallback: String): String = System.getenv(name)?.takeIf { it.isNotEmpty() } ?: fallback

fun jsonString(s: String): String {
    val out = StringBuilder("\"")
    for (c in s) {
        when {
            c == '"' -> out.append("\\\"")
            c == '\\' -> out.append("\\\\")
            c < ' ' -> out.append(String.format("\\u%04x", c.code))
            else -> out.append(c)
        }
    }
    return out.append('"').toString()
}

fun send(ex: HttpExchange, status: Int, type: String, body: String) {
    val bytes = body.toByteArray(Charsets.UTF_8)
    ex.responseHeaders.set("Content-Type", type)
    if (ex.requestMethod == "HEAD") {
        ex.sendResponseHeaders(status, -1)
    } else {
        ex.sendResponseHeaders(status, bytes.size.toLong())
        ex.responseBody.write(bytes)
    }
    ex.close()
}

fun info(): String {
    val fields = linkedMapOf(
        "worker" to jsonString(env("WORKER_NAME", "kotlin")),
        "instance" to jsonString(env("WORKER_INSTANCE", "")),
        "runtime" to jsonString("kotlin"),
        "kotlin" to jsonString(KotlinVersion.CURRENT.toString()),
        "jvm" to jsonString(System.getProperty("java.version")),
        "pid" to ProcessHandle.current().pid().toString(),
        "uptime_ms" to (System.currentTimeMillis() - started).toString(),
        "requests" to served.get().toString(),
    )
    return fields.entries.joinToString(",", "{", "}\n") { (k, v) -> "${jsonString(k)}:$v" }
}

class Routes(private val healthPath: String) : HttpHandler {
    override fun handle(ex: HttpExchange) {
        inFlight.incrementAndGet()
        try {
            served.incrementAndGet()
            ex.requestBody.use { it.readAllBytes() }   // drain any body, so keep-alive works
            if (ex.requestMethod != "GET" && ex.requestMethod != "HEAD") {
                ex.responseHeaders.set("Allow", "GET, HEAD")
                send(ex, 405, "text/plain; charset=utf-8", "405 method not allowed\n")
                return
            }
            when (ex.requestURI.path) {
                "/", "" -> send(ex, 200, "text/plain; charset=utf-8", "$GREETING\n")
                "/info" -> send(ex, 200, "application/json", info())
                "/bench" -> send(ex, 200, "text/plain; charset=utf-8", "Hello, World!")
                healthPath -> {
                    ex.responseHeaders.set("Cache-Control", "no-store")
                    send(ex, 200, "text/plain; charset=utf-8", "ok")
                }
                else -> send(ex, 404, "text/plain; charset=utf-8", "404 not found\n")
            }
        } finally {
            inFlight.decrementAndGet()
        }
    }
}

fun main() {
    val host = env("WORKER_HOST", "127.0.0.1")
    val port = env("WORKER_PORT", env("PORT", "8080")).toInt()
    val drainMillis = env("WORKER_DRAIN_SECONDS", "10").toLong() * 1000
    val server = HttpServer.create(InetSocketAddress(host, port), 128)
    val threads = maxOf(4, 2 * Runtime.getRuntime().availableProcessors())
    val pool = Executors.newFixedThreadPool(threads)
    server.executor = pool
    server.createContext("/", Routes(env("WORKER_HEALTH_PATH", "/health")))
    server.start()
    println("kotlin worker listening on http://$host:$port (${threads} threads)")

    Runtime.getRuntime().addShutdownHook(Thread {
        val deadline = System.currentTimeMillis() + drainMillis
        while (inFlight.get() > 0 && System.currentTimeMillis() < deadline) {
            Thread.sleep(10)
        }
        server.stop(0)
        pool.shutdown()
        pool.awaitTermination(1, TimeUnit.SECONDS)
        println("kotlin worker stopped (${served.get()} requests served)")
    })
}
